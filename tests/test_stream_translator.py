"""The stream translator (`hybrid.stream_translator`) alone: no HTTP, no run manager. Its input is what the real
graph streams (`stream_mode=["custom", "values"]`) with the tiny planner and the packaged SmolLM2 realizer; a few
cases feed hand-written events for states a tiny model does not reach on demand (a revision that changed the plan).

The event contract the translator reads from the plan node: `{"type": "plan_block", "block": k, "text": <plan so
far>, "delta": <this block's new text>, "plan_ms": ...}` per finished plan block, and in diffusion mode the
answer's finished blocks as `{"type": "token", "text": ...}` while the planner still runs.
"""

from __future__ import annotations

import asyncio

import pytest

from hybrid.config import HybridConfig
from hybrid.graph import build_graph
from hybrid.openai_protocol import ApiError
from hybrid.state import HybridContext
from hybrid.stream_translator import StreamTranslator, completion_body
from realizers.base import RealizerUnavailable

QUESTION = "How do I make a cup of tea?"


def _ctx(planner, realizer, **overrides) -> HybridContext:
    base = {
        "planner.gen_length": 24,
        "planner.answer_length": 24,
        "planner.steps": 24,
        "planner.block_length": 8,
        "realizer.max_tokens": 8,
        "score.clusterer": "exact",
        "score.tse_threshold": 1e9,  # the tiny random planner's drafts are accepted, degenerate or not
        "score.reject_degenerate": False,
        "revise.max_revisions": 0,
    }
    base.update(overrides)
    return HybridContext(config=HybridConfig.load(**base), planner=planner, realizer=realizer)


def _graph_events(ctx: HybridContext, mode: str) -> list[tuple[str, dict]]:
    async def go():
        inputs = {"question": QUESTION, "mode": mode}
        out = [e async for e in build_graph().astream(inputs, context=ctx, stream_mode=["custom", "values"])]
        return [*out, ("end", None)]

    return asyncio.run(go())


def _translate(events, mode: str, include_usage: bool = True) -> tuple[StreamTranslator, list[dict]]:
    tr = StreamTranslator("chatcmpl-test", "hybrid", mode, received=0.0, include_usage=include_usage)
    chunks = tr.open()
    for kind, payload in events:
        chunks += tr.feed(kind, payload, now=1.0)
    return tr, chunks


def _delta(c: dict) -> dict:
    return c["choices"][0]["delta"] if c.get("choices") else {}


def _hybrid_events(chunks) -> list[str]:
    return [c["hybrid"]["event"] for c in chunks if "hybrid" in c]


@pytest.fixture(scope="module")
def hybrid_run(tiny_planner, smol_realizer):
    return _graph_events(_ctx(tiny_planner, smol_realizer), "hybrid")


# ============================================================================================ real graph runs
def test_hybrid_run_becomes_reasoning_then_content(hybrid_run):
    """Holds with or without per-block plan events: the plan reaches the client as reasoning_content before any
    content, exactly once in total, and the realize-stage chunk carries the plan handed over and its score."""
    tr, chunks = _translate(hybrid_run, "hybrid")
    final = [p for k, p in hybrid_run if k == "values"][-1]
    assert _delta(chunks[0]) == {"role": "assistant", "content": ""}
    reasoning = "".join(_delta(c).get("reasoning_content") or "" for c in chunks)
    content = "".join(_delta(c).get("content") or "" for c in chunks)
    assert reasoning.strip() == final["plan"].strip()
    assert content.strip() == final["answer"]
    first_content = next(i for i, c in enumerate(chunks) if _delta(c).get("content"))
    last_reasoning = max(i for i, c in enumerate(chunks) if _delta(c).get("reasoning_content"))
    assert last_reasoning < first_content
    (plan_chunk,) = [c for c in chunks if c.get("hybrid", {}).get("event") == "plan"]
    info = plan_chunk["hybrid"]
    assert info["plan"] == final["plan"] and info["plan_revised"] is False
    handed, done = info["score"], final["score"]
    keys = ("value", "signal", "threshold", "degenerate", "final_confidence")
    assert {k: handed[k] for k in keys} == {k: done[k] for k in keys}
    # the clustering signals come after the answer (score.defer, the default): the final chunk carries them
    assert handed["deferred"] and handed["tse"] is None
    assert "deferred" not in done and done["tse"] is not None and done["vote"] is not None
    assert info["nfe"] > 0 and info["plan_ms"] > 0
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert finish["hybrid"]["event"] == "done" and finish["hybrid"]["score"] == final["score"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == final["usage"]["completion_tokens"]
    assert tr.done and tr.first_token == 1.0


def test_plan_blocks_stream_as_reasoning_while_planning(hybrid_run):
    """The contract with the plan node: one `plan_block` event per finished block, each one's text the
    concatenation of the deltas so far; each becomes one reasoning_content chunk, before the draft is scored,
    and the plan is not sent again at the realize stage."""
    blocks = [p for k, p in hybrid_run if k == "custom" and p["type"] == "plan_block"]
    assert blocks, "the plan node emitted no plan_block events"
    text = ""
    for k, b in enumerate(blocks):
        assert b["block"] == k and b["plan_ms"] >= 0
        text += b["delta"]
        assert b["text"] == text
    tr, chunks = _translate(hybrid_run, "hybrid")
    streamed = [c for c in chunks if _delta(c).get("reasoning_content")]
    assert [_delta(c)["reasoning_content"] for c in streamed] == [b["delta"] for b in blocks if b["delta"]]
    assert all(c["hybrid"]["event"] == "plan_block" for c in streamed)
    order = _hybrid_events(chunks)
    assert order.index("score") > max(i for i, e in enumerate(order) if e == "plan_block")
    (plan_chunk,) = [c for c in chunks if c.get("hybrid", {}).get("event") == "plan"]
    assert "reasoning_content" not in _delta(plan_chunk)


def test_diffusion_mode_streams_the_answer_while_planning(tiny_planner):
    """Diffusion mode: the planner's finished answer blocks are content as they come (before the realize
    stage), and nothing is sent as reasoning (the blocks are the answer, not a plan)."""
    events = _graph_events(_ctx(tiny_planner, None), "diffusion")
    custom = [p for k, p in events if k == "custom"]
    realize_at = next(i for i, p in enumerate(custom) if p["type"] == "status" and p.get("stage") == "realize")
    assert any(p["type"] == "token" for p in custom[:realize_at]), "no answer block was streamed while planning"
    tr, chunks = _translate(events, "diffusion")
    assert not any(_delta(c).get("reasoning_content") for c in chunks)
    first_content = next(i for i, c in enumerate(chunks) if _delta(c).get("content"))
    plan_chunk = next(i for i, c in enumerate(chunks) if c.get("hybrid", {}).get("event") == "plan")
    assert first_content < plan_chunk


def test_ar_mode_has_no_plan_chunks(smol_realizer):
    events = _graph_events(_ctx(None, smol_realizer), "ar")
    tr, chunks = _translate(events, "ar", include_usage=False)
    assert not any(_delta(c).get("reasoning_content") for c in chunks)
    assert "plan" not in _hybrid_events(chunks)
    assert "".join(_delta(c).get("content") or "" for c in chunks).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] and chunks[-1]["hybrid"]["mode"] == "ar"


def test_completion_body_carries_the_plan_handed_over(hybrid_run):
    final = [p for k, p in hybrid_run if k == "values"][-1]
    body = completion_body(final, "chatcmpl-x", "hybrid", "hybrid", received=0.0, now=2.5)
    msg = body["choices"][0]["message"]
    assert msg["reasoning_content"] == final["plan"] and msg["content"] == final["answer"]
    assert body["hybrid"]["timings"]["server_total_ms"] == 2500.0 and body["hybrid"]["score"] == final["score"]
    ar = completion_body({**final, "mode": "ar"}, "chatcmpl-y", "hybrid", "ar", received=0.0)
    assert ar["choices"][0]["message"]["reasoning_content"] is None


# ============================================================================================ hand-written events
def _realize_status(plan: str, **kw) -> dict:
    return {"type": "status", "stage": "realize", "mode": "hybrid", "plan": plan, "tse": 0.5, "revisions": 1, **kw}


def test_a_revision_that_changed_the_plan_is_flagged():
    draft, revised = "1. Boil water. 2. Steep.", "1. Boil water. 2. Add tea. 3. Steep."
    score = {"tse": 0.2, "value": 0.7}
    events = [
        (
            "custom",
            {"type": "plan_block", "block": 0, "text": "1. Boil water.", "delta": "1. Boil water.", "plan_ms": 5},
        ),
        ("custom", {"type": "plan_block", "block": 1, "text": draft, "delta": " 2. Steep.", "plan_ms": 9}),
        ("custom", {"type": "plan", "text": draft, "nfe": 8, "plan_ms": 9.0}),
        ("custom", {"type": "revise", "revision": 1, "positions": 3, "text": revised}),
        ("values", {"plan": revised, "score": score, "accepted": True, "revisions": 1, "timings": {"nfe": 12}}),
        ("custom", _realize_status(revised)),
        ("custom", {"type": "token", "text": "Boil"}),
    ]
    _, chunks = _translate(events, "hybrid")
    assert "".join(_delta(c).get("reasoning_content") or "" for c in chunks) == draft  # streamed once, as drafted
    (info,) = [c["hybrid"] for c in chunks if c.get("hybrid", {}).get("event") == "plan"]
    assert info["plan_revised"] is True and info["plan"] == revised and info["score"] == score


def test_the_best_drafts_score_rides_with_the_plan():
    """The plan handed over is the best draft (not necessarily the last one scored): its score goes with it."""
    best = {"plan": "A plan.", "tse": 0.3, "score": {"tse": 0.3, "value": 0.9}}
    state = {"plan": "Another plan.", "score": {"tse": 1.7}, "best": best, "accepted": True, "timings": {}}
    events = [
        ("custom", {"type": "plan", "text": "A plan.", "nfe": 4, "plan_ms": 3.0}),
        ("values", state),
        ("custom", _realize_status("A plan.", accepted=True)),
    ]
    _, chunks = _translate(events, "hybrid")
    (plan_chunk,) = [c for c in chunks if c.get("hybrid", {}).get("event") == "plan"]
    # no plan block was streamed: the plan goes out whole, once, at the realize stage
    assert _delta(plan_chunk) == {"reasoning_content": "A plan."}
    assert plan_chunk["hybrid"]["score"] == best["score"] and plan_chunk["hybrid"]["plan_revised"] is False


def test_an_unaccepted_plan_is_not_handed_over():
    """Hybrid mode with no accepted draft: the realizer answers alone; the plan chunk says so (plan null) and
    still carries the best draft's score (why it was refused)."""
    best = {"plan": "a a a a", "tse": 2.0, "score": {"tse": 2.0, "value": 2.0, "degenerate": "repetition"}}
    state = {"plan": "a a a a", "score": best["score"], "best": best, "accepted": False, "timings": {}}
    events = [
        ("custom", {"type": "plan_block", "block": 0, "text": "a a a a", "delta": "a a a a", "plan_ms": 2}),
        ("custom", {"type": "plan", "text": "a a a a", "nfe": 4, "plan_ms": 3.0}),
        ("values", state),
        ("custom", _realize_status(None, accepted=False)),
        ("custom", {"type": "token", "text": "Tea"}),
    ]
    _, chunks = _translate(events, "hybrid")
    (plan_chunk,) = [c for c in chunks if c.get("hybrid", {}).get("event") == "plan"]
    assert _delta(plan_chunk) == {} and plan_chunk["hybrid"]["plan"] is None
    assert plan_chunk["hybrid"]["accepted"] is False and plan_chunk["hybrid"]["score"]["degenerate"] == "repetition"


def test_an_error_becomes_one_error_object():
    tr = StreamTranslator("chatcmpl-e", "hybrid", "hybrid", received=0.0)
    out = tr.feed("error", RealizerUnavailable("cannot connect", where="http://127.0.0.1:1/v1"))
    assert tr.done and isinstance(tr.error, ApiError)
    assert out == [tr.error.body()] and out[0]["error"]["code"] == "realizer_unavailable"
    assert tr.feed("ping", None) == [] and tr.feed("cancelled", None) == []
