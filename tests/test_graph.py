"""The real LangGraph workflow: routing, streaming, the three modes, subgraph use, SQLite persistence.

Planner: a tiny random block-causal backbone with SmolLM2's tokenizer (real sampler, real trajectory,
real TSE); realizer: the packaged SmolLM2-135M-Instruct in process (real streaming)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest

from hybrid.config import HybridConfig
from hybrid.graph import build_graph
from hybrid.state import HybridContext, HybridState


def _ctx(planner, realizer, **overrides):
    base = {
        "planner.gen_length": 16,
        "planner.answer_length": 24,
        "planner.steps": 16,
        "planner.block_length": 8,
        "realizer.max_tokens": 12,
        "score.clusterer": "exact",
        # routing and streaming tests: accept on TSE, the random planner's repetitive drafts not rejected as
        # degenerate (the score gate itself: tests/test_score_gate.py)
        "score.signal": "tse",
        "score.reject_degenerate": False,
    }
    base.update(overrides)
    return HybridContext(config=HybridConfig.load(**base), planner=planner, realizer=realizer)


async def _run(graph, ctx, question="How do I make a cup of tea?", mode=None, config=None):
    events, final = [], None
    inputs = {"question": question, **({"mode": mode} if mode else {})}
    async for kind, chunk in graph.astream(inputs, config, context=ctx, stream_mode=["custom", "values"]):
        if kind == "custom":
            events.append((time.perf_counter(), chunk))
        else:
            final = chunk
    return events, final


def test_low_tse_goes_straight_to_realize(tiny_planner, smol_realizer):
    ctx = _ctx(tiny_planner, smol_realizer, **{"score.tse_threshold": 1e9})
    events, final = asyncio.run(_run(build_graph(), ctx))
    assert final["accepted"] is True and final["revisions"] == 0
    kinds = [e["type"] for _, e in events]
    assert "revise" not in kinds and kinds.count("score") == 1
    assert final["answer"] and final["plan"]


def test_high_tse_revises_until_budget_then_realizes(tiny_planner, smol_realizer):
    ctx = _ctx(tiny_planner, smol_realizer, **{"score.tse_threshold": 0.0, "revise.max_revisions": 2})
    events, final = asyncio.run(_run(build_graph(), ctx))
    scores = [e for _, e in events if e["type"] == "score"]
    assert scores[0]["tse"] > 0.0  # the random planner's draft is unstable (deterministic with seed 0)
    if all(s["tse"] > 0.0 for s in scores):
        assert final["revisions"] == 2 and len(scores) == 3
        assert final["accepted"] is False
        assert any("not accepted" in w for w in final["warnings"])
        # the best draft (lowest TSE, earliest on ties) is what was handed on
        best = min(range(len(scores)), key=lambda i: (scores[i]["tse"], i))
        assert final["best"]["tse"] == scores[best]["tse"]
    else:  # a revision reached TSE 0: accepted early, within budget
        assert final["accepted"] is True and final["revisions"] <= 2
    assert [e["type"] for _, e in events].count("revise") == final["revisions"]
    assert final["answer"]


class _PacedRealizer:
    """The real realizer, with each text delta stamped when it leaves the model's stream (its production
    time) and a pause before the next one, so a pipeline that held tokens back would be seen doing so."""

    def __init__(self, inner, pause_s: float = 0.02):
        self.inner, self.pause_s, self.produced = inner, pause_s, []
        self.name, self.context_length = inner.name, inner.context_length

    def prompt_ids(self, messages):
        return self.inner.prompt_ids(messages)

    async def astream(self, messages, params=None):
        from realizers.base import TextDelta

        async for ev in self.inner.astream(messages, params):
            if isinstance(ev, TextDelta) and ev.text:
                if self.produced:
                    await asyncio.sleep(self.pause_s)
                self.produced.append(time.perf_counter())
            yield ev


class _PacedPlanner:
    """The real (tiny) planner, with each finished block stamped when the sampler reports it and a pause
    after it, so an answer that only left after the whole plan would be seen."""

    def __init__(self, inner, pause_s: float = 0.05):
        self.inner, self.pause_s, self.blocks = inner, pause_s, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan(self, prompt, *, on_block=None, **kw):
        def paced(progress):
            self.blocks.append((time.perf_counter(), progress))
            stop = on_block(progress) if on_block is not None else None
            time.sleep(self.pause_s)
            return stop

        return self.inner.plan(prompt, on_block=paced, **kw)


def test_tokens_stream_while_the_realizer_writes(tiny_planner, smol_realizer):
    paced = _PacedRealizer(smol_realizer)
    ctx = _ctx(tiny_planner, paced, **{"score.tse_threshold": 1e9, "realizer.max_tokens": 24})
    events, final = asyncio.run(_run(build_graph(), ctx))
    received = [t for t, e in events if e["type"] == "token"]
    assert len(paced.produced) >= 3 and len(received) == len(paced.produced)
    # the first token reached the consumer before the model had produced its last one
    assert received[0] < paced.produced[-1]
    assert "".join(e["text"] for _, e in events if e["type"] == "token").strip() == final["answer"]


def test_diffusion_answer_streams_block_by_block(tiny_planner, smol_realizer):
    """Diffusion mode: each finished block's text leaves while later blocks are still being denoised;
    TTFT is the first block's time and the rate counts only the streaming interval."""
    paced = _PacedPlanner(tiny_planner)
    ctx = _ctx(paced, smol_realizer, mode="diffusion", **{"score.tse_threshold": 1e9, "planner.answer_length": 32})
    events, final = asyncio.run(_run(build_graph(), ctx))
    tokens = [(t, e) for t, e in events if e["type"] == "token"]
    assert len(paced.blocks) >= 2 and tokens
    assert tokens[0][0] < paced.blocks[-1][0]  # the answer began before the planner's last block
    assert "".join(e["text"] for _, e in tokens).strip() == final["answer"].strip()
    t = final["timings"]
    assert t["ttft_ms"] < t["total_ms"]
    interval = t["last_token_at"] - t["first_token_at"]
    assert interval > 0
    expected = (len(final["plan_tokens"]) - t["first_tokens"]) / interval
    assert t["tokens_per_s"] == pytest.approx(expected)


def test_plan_streams_as_it_forms(tiny_planner, smol_realizer):
    ctx = _ctx(tiny_planner, smol_realizer, **{"score.tse_threshold": 1e9, "planner.gen_length": 24})
    events, final = asyncio.run(_run(build_graph(), ctx))
    blocks = [e for _, e in events if e["type"] == "plan_block"]
    assert len(blocks) >= 1 and [b["block"] for b in blocks] == sorted(b["block"] for b in blocks)
    text = ""
    for b in blocks:  # each event's text is the previous text plus its delta
        assert b["text"] == text + b["delta"]
        text = b["text"]
    assert blocks[-1]["ended"] and text.strip() == final["plan"]
    kinds = [e["type"] for _, e in events]
    assert kinds.index("plan_block") < kinds.index("plan") < kinds.index("token")


@pytest.mark.parametrize("mode", ["hybrid", "diffusion", "ar"])
def test_three_modes_one_output_shape(tiny_planner, smol_realizer, mode):
    ctx = _ctx(tiny_planner, smol_realizer, mode=mode, **{"score.tse_threshold": 1e9})
    events, final = asyncio.run(_run(build_graph(), ctx))
    state = HybridState(**final)  # same schema for every mode
    assert state.mode == mode
    for key in ("plan_ms", "ttft_ms", "total_ms", "tokens_per_s"):
        if mode == "ar" and key == "plan_ms":
            continue
        assert key in state.timings
    if mode == "ar":
        assert state.plan is None and state.trajectory is None and state.answer
    else:
        assert state.trajectory is not None and state.plan_stats["nfe"] > 0
    if mode == "diffusion":
        assert state.answer == state.plan  # the planner wrote the answer itself
    if mode == "hybrid":
        assert state.plan and state.answer
    assert any(e["type"] == "token" for _, e in events)


def test_graph_works_as_a_subgraph(tiny_planner, smol_realizer):
    from langgraph.graph import END, START, StateGraph

    inner = build_graph()

    async def shout(state: HybridState):
        return {"answer": state.answer.upper()}

    outer = StateGraph(HybridState, context_schema=HybridContext)
    outer.add_node("hybrid", inner)
    outer.add_node("shout", shout)
    outer.add_edge(START, "hybrid")
    outer.add_edge("hybrid", "shout")
    outer.add_edge("shout", END)
    ctx = _ctx(tiny_planner, smol_realizer, **{"score.tse_threshold": 1e9})

    async def go():
        tokens, final = [], None
        async for ns, kind, chunk in outer.compile().astream(
            {"question": "Name a colour."}, context=ctx, stream_mode=["custom", "values"], subgraphs=True
        ):
            if kind == "custom" and chunk["type"] == "token":
                tokens.append(chunk["text"])
            elif kind == "values" and not ns:
                final = chunk
        return tokens, final

    tokens, final = asyncio.run(go())
    assert tokens and final["answer"] == final["answer"].upper() and final["answer"]


def test_conversation_persists_across_processes(tmp_path, smol_dir):
    """Process 1 asks; process 2, same SQLite file and thread id, continues the conversation."""
    db = tmp_path / "conv.sqlite"
    script = textwrap.dedent(
        """
        import asyncio, json, sys
        from hybrid.cli import run_once
        from hybrid.config import HybridConfig
        from hybrid.runtime import build_context
        cfg = HybridConfig.load(**{"mode": "ar", "realizer.max_tokens": 8})
        ctx = build_context(cfg)
        final = asyncio.run(run_once(sys.argv[1], ctx, thread_id="t-1", db=sys.argv[2], on_event=lambda e: None))
        print(json.dumps({"history": final["history"], "answer": final["answer"]}))
        """
    )

    def turn(q: str) -> dict:
        p = subprocess.run([sys.executable, "-c", script, q, str(db)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = turn("My name is Ada. Say hello.")
    assert len(first["history"]) == 2
    second = turn("What is my name?")
    hist = second["history"]
    assert len(hist) == 4  # the second process saw the first turn from the checkpoint
    assert hist[0]["content"] == "My name is Ada. Say hello." and hist[2]["content"] == "What is my name?"
