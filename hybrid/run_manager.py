"""The server's run manager: admission, graph runs on the server's own event loop, cancellation, metrics.

    RunManager(graph, metrics=...)     owns a thread with its own event loop and thread pool ("the model loop")
    manager.admit()                    counts the request active, or raises `Overloaded` past `max_active`
    manager.submit(inputs, ctx, rid)   starts one graph run there; returns its `Run`
    run.events(keepalive_s)            the run's events on the caller's loop, in order, with keep-alive pings
    manager.abandon(run)               the client left: cancel the run (counted once)
    manager.finish(run, outcome)       count a run the caller saw end ("completed" or "failed")
    Metrics                            counters behind one lock (`add`, `peak`, `snapshot`)

Why a loop of its own: the graph's nodes call the planner and the scorer through `asyncio.to_thread`, one pool
thread per waiting request, and the default pool (min(32, cpus + 4) threads) would cap planner batches at its
size. Rather than replace the default executor of whatever loop serves HTTP (which belongs to the process, or
to an app this one is mounted in), graph runs execute on a loop this manager owns, whose default executor is
the manager's own pool. HTTP handling stays on the server's loop; events cross over with
`call_soon_threadsafe`, and a cancellation crosses back through the run's `concurrent.futures.Future`.

What it does not know: HTTP, OpenAI's formats, or what the graph does — it runs `graph.astream(inputs,
context=ctx, stream_mode=["custom", "values"])` and passes the events on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from planners.batching import _REQUEST, _Handle
from realizers.counters import LockedCounters

log = logging.getLogger("hybrid.server")

LAST_EVENTS = ("end", "error", "cancelled")


# ============================================================================================ metrics
@dataclass
class Metrics(LockedCounters):
    """The server's counters (`GET /metrics`). Every write goes through `add` / `peak`, under one lock: the
    `BatchingPlanner` writes from its worker thread, the `FallbackRealizer` and finished runs from the model
    loop, requests from the HTTP loop. It is also the `metrics` object of those two (their counters are fields
    here: `planners.batching.BatchStats`, `realizers.fallback.FallbackStats`)."""

    started_at: float = field(default_factory=time.time)
    requests: int = 0
    rejected: int = 0  # answered 4xx before any model work
    active: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0  # client disconnected before the answer was complete: its run was cancelled
    fallbacks: int = 0  # requests the fallback realizer answered
    plan_batches: int = 0
    plan_rows: int = 0
    plan_max_batch: int = 0
    plans_skipped: int = 0  # queued planner calls dropped because their request was cancelled

    def admit(self, limit: int) -> bool:
        """Count one more active request unless `limit` are active; False if it was refused."""
        with self._lock:
            if self.active >= limit:
                return False
            self.active += 1
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["uptime_s"] = round(time.time() - d.pop("started_at"), 1)
        d["plan_mean_batch"] = round(d["plan_rows"] / d["plan_batches"], 2) if d["plan_batches"] else 0.0
        return d


class Overloaded(RuntimeError):
    """`max_active` requests are running; the caller answers 429."""


# ============================================================================================ one run
class Run:
    """One graph run on the model loop. Its events ("custom", "values", then one of "end", "error",
    "cancelled") reach `events()` on the loop that submitted it, in order. `cancel()` stops it."""

    def __init__(self, rid: str, loop: asyncio.AbstractEventLoop) -> None:
        self.rid = rid
        self.handle = _Handle(rid)
        self.received = time.time()
        self.finished = False  # a consumer has seen the last event
        self._loop = loop  # the consumer's loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.future: concurrent.futures.Future | None = None

    def _put(self, item: tuple[str, Any]) -> None:
        """From the model loop: hand one event to the consumer's loop (dropped if that loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass

    async def _main(self, graph: Any, inputs: dict[str, Any], ctx: Any, timeout_s: float) -> None:
        _REQUEST.set(self.handle)  # this task's own context: node tasks and their worker threads inherit it
        try:
            async with asyncio.timeout(timeout_s):
                async for mode, chunk in graph.astream(inputs, context=ctx, stream_mode=["custom", "values"]):
                    self._put((mode, chunk))
        except asyncio.CancelledError:
            self._put(("cancelled", None))
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client
            self._put(("error", e))
        else:
            self._put(("end", None))

    async def events(self, keepalive_s: float) -> AsyncIterator[tuple[str, Any]]:
        """Events in order; ("ping", None) after `keepalive_s` of silence. Ends after the last event."""
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter}, timeout=keepalive_s)
                if not done:
                    yield ("ping", None)
                    continue
                item, getter = getter.result(), None
                if item[0] in LAST_EVENTS:
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:
            if getter is not None:
                getter.cancel()

    def cancel(self) -> bool:
        """Cancel the run if it is still going; True if it was. Does not wait: the realize node's stream is
        closed as the cancellation unwinds the graph on the model loop."""
        if self.finished or self.future is None or self.future.done():
            return False
        self.handle.cancelled.set()  # queued planner calls of this request are dropped
        if not self.future.cancel():
            return False
        # the last event for a consumer still reading, even if the run never started (then `_main` sends none)
        self._put(("cancelled", None))
        return True


# ============================================================================================ the manager
class RunManager:
    """Admission, graph runs on a loop of its own, cancellation and the counters that go with them."""

    def __init__(
        self,
        graph: Any,
        *,
        metrics: Metrics | None = None,
        max_active: int = 256,
        request_timeout_s: float = 300.0,
        max_workers: int | None = None,
    ) -> None:
        self.graph = graph
        self.metrics = metrics or Metrics()
        self.max_active = max_active
        self.request_timeout_s = request_timeout_s
        # one pool thread per request waiting in the planner queue, plus room for scoring and tokenizing
        self.max_workers = max_workers or max_active + 32
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the model loop (idempotent)."""
        if self._thread is not None:
            return
        self.executor = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="hybrid-run")
        loop = asyncio.new_event_loop()
        loop.set_default_executor(self.executor)  # this loop is ours: the pool serves only graph runs
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="hybrid-model-loop", daemon=True)
        self._thread.start()
        ready.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel what still runs, stop the model loop and the pool."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("runs still unwinding at shutdown")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self._loop = self._thread = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the run manager is not started")
        return self._loop

    # ------------------------------------------------------------------ requests
    def admit(self) -> None:
        """Count a request active; raise `Overloaded` if `max_active` already are. Every admitted request
        is released exactly once: by its run's end, or by `release()` when no run was started."""
        if not self.metrics.admit(self.max_active):
            raise Overloaded(f"the server is at its limit of {self.max_active} concurrent requests; retry shortly")

    def release(self) -> None:
        """An admitted request that never started a run."""
        self.metrics.add(active=-1)

    def submit(self, inputs: dict[str, Any], ctx: Any, rid: str) -> Run:
        """Start the graph on `inputs` with `ctx` on the model loop (call from a running loop: the consumer's).
        The request must have been admitted; its active count is released when the run ends."""
        run = Run(rid, asyncio.get_running_loop())
        coro = run._main(self.graph, inputs, ctx, self.request_timeout_s)
        run.future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        run.future.add_done_callback(lambda _f: self.metrics.add(active=-1))
        return run

    def abandon(self, run: Run) -> bool:
        """The client left before the end: cancel its run and count it. A no-op after the last event."""
        if run.cancel():
            self.metrics.add(cancelled=1)
            log.info("%s cancelled: the client disconnected", run.rid)
            return True
        return False

    def finish(self, run: Run, outcome: str) -> None:
        """Count a run whose last event the caller handled: "completed" or "failed"."""
        if outcome not in ("completed", "failed"):
            raise ValueError(f"outcome must be 'completed' or 'failed', got {outcome!r}")
        self.metrics.add(**{outcome: 1})

    async def run_in_pool(self, fn, *args) -> Any:
        """Call `fn(*args)` in the manager's pool from any loop (tokenizing a request before admission)."""
        if self.executor is None:
            raise RuntimeError("the run manager is not started")
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
