"""The server's run manager (`hybrid.run_manager`) alone: no HTTP. Graph runs are real LangGraph graphs — a small
one whose node streams events and blocks pool threads (to see where they run, how many at once, and how a run is
cancelled or timed out), and the project's own graph in diffusion mode with the tiny planner.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from hybrid.run_manager import Metrics, Overloaded, RunManager
from planners.batching import BatchStats


class _S(TypedDict, total=False):
    n: int
    out: list[str]


def blocking_graph(release: threading.Event, seen: list[str]):
    """One node: emits `tick`, then waits in `asyncio.to_thread` until `release` is set (recording the pool
    thread's name), then emits `tock`."""

    async def work(state: _S) -> dict[str, Any]:
        write = get_stream_writer()
        write({"type": "tick", "n": state["n"]})

        def block() -> str:
            seen.append(threading.current_thread().name)
            release.wait(30)
            return "ok"

        out = await asyncio.to_thread(block)
        write({"type": "tock", "n": state["n"]})
        return {"out": [out]}

    g = StateGraph(_S)
    g.add_node("work", work)
    g.add_edge(START, "work")
    g.add_edge("work", END)
    return g.compile()


async def _drain(run, keepalive_s: float = 5.0) -> list[tuple[str, Any]]:
    return [e async for e in run.events(keepalive_s)]


@pytest.fixture
def manager_factory():
    made: list[RunManager] = []

    def make(graph, **kw) -> RunManager:
        m = RunManager(graph, **kw)
        m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_runs_use_the_managers_pool_not_the_callers_default_executor(manager_factory):
    """40 runs each hold a pool thread at once (more than the default pool's min(32, cpus + 4)): all reach the
    blocking call before any is released, on threads of the manager's pool; the caller's loop keeps its own
    default executor."""
    release, seen = threading.Event(), []
    n = 40
    mgr = manager_factory(blocking_graph(release, seen), max_active=n)

    async def go():
        loop = asyncio.get_running_loop()
        before = loop._default_executor
        runs = []
        for i in range(n):
            mgr.admit()
            runs.append(mgr.submit({"n": i}, None, f"r{i}"))
        deadline = time.monotonic() + 20
        while len(seen) < n:
            assert time.monotonic() < deadline, f"only {len(seen)} of {n} runs reached the pool at once"
            await asyncio.sleep(0.02)
        release.set()
        results = await asyncio.gather(*(_drain(r) for r in runs))
        assert loop._default_executor is before
        return results

    results = asyncio.run(go())
    assert all(name.startswith("hybrid-run") for name in seen), set(seen)
    for i, events in enumerate(results):
        kinds = [k for k, _ in events]
        assert kinds[-1] == "end"
        custom = [p["type"] for k, p in events if k == "custom"]
        assert custom == ["tick", "tock"]
        assert events[0] == ("values", {"n": i})  # in order: the input state first, then the node's events
        assert events[1] == ("custom", {"type": "tick", "n": i})
        assert [p for k, p in events if k == "values"][-1]["out"] == ["ok"]
    assert mgr.metrics.active == 0


def test_admission_limit_and_release(manager_factory):
    release, seen = threading.Event(), []
    mgr = manager_factory(blocking_graph(release, seen), max_active=2)

    async def go():
        mgr.admit()
        a = mgr.submit({"n": 0}, None, "a")
        mgr.admit()
        mgr.release()  # admitted, then refused before its run started: counted back
        mgr.admit()
        b = mgr.submit({"n": 1}, None, "b")
        with pytest.raises(Overloaded, match="limit of 2"):
            mgr.admit()
        assert mgr.metrics.active == 2
        release.set()
        await asyncio.gather(_drain(a), _drain(b))
        deadline = time.monotonic() + 5
        while mgr.metrics.active:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        mgr.admit()  # room again
        mgr.release()

    asyncio.run(go())


def test_abandon_cancels_a_running_run_once(manager_factory):
    release, seen = threading.Event(), []
    mgr = manager_factory(blocking_graph(release, seen))

    async def go():
        mgr.admit()
        run = mgr.submit({"n": 0}, None, "gone")
        events = run.events(5.0)
        assert await anext(events) == ("values", {"n": 0})
        assert await anext(events) == ("custom", {"type": "tick", "n": 0})
        while not seen:  # the node is blocked in the pool
            await asyncio.sleep(0.01)
        assert mgr.abandon(run) and run.handle.cancelled.is_set()
        assert not mgr.abandon(run)  # counted once
        rest = [e async for e in events]
        return rest

    rest = asyncio.run(go())
    release.set()
    assert rest[-1] == ("cancelled", None) and ("custom", {"type": "tock", "n": 0}) not in rest
    assert mgr.metrics.cancelled == 1 and mgr.metrics.active == 0


def test_timeout_ends_a_run_with_an_error_and_pings_keep_the_stream_alive(manager_factory):
    release, seen = threading.Event(), []
    mgr = manager_factory(blocking_graph(release, seen), request_timeout_s=0.6)

    async def go():
        mgr.admit()
        return await _drain(mgr.submit({"n": 0}, None, "slow"), keepalive_s=0.2)

    events = asyncio.run(go())
    release.set()
    kinds = [k for k, _ in events]
    assert "ping" in kinds and kinds[-1] == "error" and isinstance(events[-1][1], TimeoutError)


def test_the_projects_graph_runs_through_the_manager(manager_factory, tiny_planner):
    """Diffusion mode (the planner answers alone) of the real graph, with the tiny planner."""
    from hybrid.config import HybridConfig
    from hybrid.graph import build_graph
    from hybrid.state import HybridContext

    cfg = HybridConfig.load(
        **{"mode": "diffusion", "planner.answer_length": 16, "planner.gen_length": 16, "planner.steps": 16},
        **{"score.clusterer": "exact", "revise.max_revisions": 0},
    )
    mgr = manager_factory(build_graph())

    async def go():
        mgr.admit()
        run = mgr.submit({"question": "How do I make tea?", "mode": "diffusion"}, HybridContext(cfg, tiny_planner), "g")
        return await _drain(run, keepalive_s=30)

    events = asyncio.run(go())
    assert events[-1][0] == "end", events[-1]
    types = [p["type"] for k, p in events if k == "custom"]
    assert "plan" in types and "score" in types and "done" in types
    final = [p for k, p in events if k == "values"][-1]
    assert final["mode"] == "diffusion" and final["timings"]["plan_ms"] > 0


@pytest.mark.parametrize("make", [Metrics, BatchStats], ids=["server-metrics", "batch-stats"])
def test_counters_are_exact_under_concurrent_writers(make):
    """The planner's worker, the model loop and the HTTP loop write counters from different threads."""
    m = make()
    n_threads, n = 8, 5000

    def hammer(k: int) -> None:
        for i in range(n):
            m.add(plan_rows=1, plan_batches=1)
            m.peak("plan_max_batch", k * n + i)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.plan_rows == m.plan_batches == n_threads * n
    assert m.plan_max_batch == n_threads * n - 1
    if isinstance(m, Metrics):
        snap = m.snapshot()
        assert snap["plan_rows"] == n_threads * n and snap["plan_mean_batch"] == 1.0 and "_lock" not in snap
