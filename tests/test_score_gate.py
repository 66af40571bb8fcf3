"""The score gate in the real graph: `score["value"]`, degenerate drafts never accepted, revise attempts that
differ, and an untrusted plan never handed to the realizer (it answers alone, flagged unplanned).

Planner: the tiny random block-causal backbone with SmolLM2's tokenizer; realizer: the packaged SmolLM2."""

from __future__ import annotations

import asyncio

from hybrid.config import HybridConfig
from hybrid.graph import build_graph
from hybrid.state import HybridContext, HybridState
from planners.trajectory import Trajectory, TrajectoryStep


def _ctx(planner, realizer, **overrides):
    base = {"planner.gen_length": 16, "planner.answer_length": 16, "planner.steps": 16, "planner.block_length": 8,
            "realizer.max_tokens": 8, "score.clusterer": "exact"}  # fmt: skip
    base.update(overrides)
    return HybridContext(config=HybridConfig.load(**base), planner=planner, realizer=realizer)


async def _run(ctx, question="How do I make a cup of tea?"):
    events, final = [], None
    async for kind, chunk in build_graph().astream(
        {"question": question}, context=ctx, stream_mode=["custom", "values"]
    ):
        if kind == "custom":
            events.append(chunk)
        else:
            final = chunk
    return events, final


def _confident_state(planner, text: str) -> HybridState:
    """A draft whose every token was committed at confidence 0.99 (the signal alone would trust it)."""
    ids = planner.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = planner.model.config.eos_token_id
    span = ids + [eos] * (-len(ids) % 8)
    steps = [
        TrajectoryStep(step=i, block=i // 8, committed=[i], confidences=[0.99], x0_hat=list(span))
        for i in range(len(ids))
    ]
    traj = Trajectory(prompt_length=5, gen_length=len(span), mask_id=16, steps=steps, final=list(span), nfe=len(steps))
    return HybridState(
        question="How do I make a cup of tea?", mode="hybrid", plan=text, plan_tokens=ids, plan_span=span,
        prompt_ids=[1, 2, 3, 4, 5], trajectory=traj.to_dict(), timings={"started_at": 0.0},
    )  # fmt: skip


def test_the_issue_plan_is_not_accepted_and_not_handed_over(tiny_planner, smol_realizer):
    from langgraph.runtime import Runtime

    from hybrid import nodes

    ctx = _ctx(tiny_planner, smol_realizer, **{"score.signal": "low_confidence", "score.threshold": 0.5,
                                              "revise.max_revisions": 0})  # fmt: skip
    rt = Runtime(context=ctx)
    bad = _confident_state(tiny_planner, "Then, you'll want to add a tea bag or a tea filter. Next a a a")
    out = asyncio.run(nodes.score(bad, rt))
    assert out["score"]["value"] < 0.5  # the signal alone would have accepted it ...
    assert out["score"]["degenerate"] and out["accepted"] is False  # ... the degeneracy check does not
    state = bad.model_copy(update=out)
    assert nodes.route_after_score(state, rt) == "realize"  # budget 0: spent
    done = asyncio.run(nodes.realize(state, rt))
    assert done["plan"] is None and done["answer"]  # the realizer answered alone
    assert any("unplanned" in w and "degenerate" in w for w in done["warnings"])

    good = _confident_state(tiny_planner, "Boil water, pour it over the tea bag, wait three minutes.")
    out = asyncio.run(nodes.score(good, rt))
    assert out["accepted"] is True and out["score"]["degenerate"] is None
    done = asyncio.run(nodes.realize(good.model_copy(update=out), rt))
    assert done["plan"] == good.plan and not done["warnings"]  # a trusted plan is handed over


def test_untrusted_after_budget_answers_unplanned_and_attempts_differ(tiny_planner, smol_realizer):
    ctx = _ctx(tiny_planner, smol_realizer, **{"score.threshold": 0.0, "score.signal": "low_confidence",
                                              "revise.max_revisions": 2})  # fmt: skip
    events, final = asyncio.run(_run(ctx))
    scores = [e for e in events if e["type"] == "score"]
    assert len(scores) == 3 and final["revisions"] == 2 and final["accepted"] is False
    assert all("value" in s and s["signal"] == "low_confidence" for s in scores)
    assert final["score"]["value"] is not None and "tse" in final["score"]
    hist = final["revision_history"]
    assert [h["seed"] for h in hist] == [1, 2]  # a seed per attempt
    if hist[0]["parent_span"] == hist[1]["parent_span"]:  # the same draft twice: never the same positions
        assert hist[0]["positions"] != hist[1]["positions"]
    status = next(e for e in events if e["type"] == "status" and e.get("stage") == "realize")
    assert status["plan"] is None  # the untrusted best draft never reached the realizer
    assert final["plan"] is None and final["answer"]
    assert any("unplanned" in w for w in final["warnings"])


def test_clustering_signals_wait_for_the_answer_and_match_the_eager_score(tiny_planner, smol_realizer):
    """score.defer (the default): with a signal that needs no clustering, the score event and the realize stage
    see the value (and decide on it) without TSE, flip rate or vote; the final state has them, for the current
    and the best draft, equal to what the eager score computes. With a clustering signal, or defer off, nothing
    waits."""
    from hybrid import nodes

    over = {"score.signal": "low_confidence", "score.threshold": 0.0, "revise.max_revisions": 1}
    events, final = asyncio.run(_run(_ctx(tiny_planner, smol_realizer, **over)))
    scores = [e for e in events if e["type"] == "score"]
    assert len(scores) == 2 and all(s["tse"] is None and s["deferred"] for s in scores)
    assert all(s["value"] is not None for s in scores)  # the decision had its signal
    status = next(e for e in events if e["type"] == "status" and e.get("stage") == "realize")
    assert status["tse"] is None
    assert final["timings"]["score_deferred_ms"] > 0
    ctx = _ctx(tiny_planner, smol_realizer, **over)
    for draft in (final["score"], final["best"]["score"]):
        assert "deferred" not in draft and draft["tse"] is not None and draft["vote"] is not None
    eager = nodes.score_summary(Trajectory.from_dict(final["trajectory"]), ctx)
    assert final["score"] == {**eager, "threshold": 0.0}
    assert final["tse"] == eager["tse"] and final["best"]["tse"] == final["best"]["score"]["tse"]

    for extra in ({"score.signal": "tse", "score.threshold": 99.0}, {"score.defer": False}):
        events, final = asyncio.run(_run(_ctx(tiny_planner, smol_realizer, **{**over, **extra})))
        assert all(e["tse"] is not None for e in events if e["type"] == "score")
        assert "score_deferred_ms" not in final["timings"]
