"""The graph's nodes as plain functions over (state, runtime): reuse them in your own LangGraph graphs.

    plan     diffusion planner drafts a plan (hybrid) or the answer itself (diffusion); records the trajectory
    score    temporal semantic entropy of the trajectory (+ vote, flip rate, mean entropy); keeps the best draft
    revise   remasks the least settled part of the plan and denoises it again (or resamples), one attempt per visit
    realize  the AR realizer streams the answer (hybrid: following the plan; ar: alone; diffusion: the plan is
             the answer and is streamed as is)

Every node reads models from `runtime.context` (`HybridContext`) and writes progress to LangGraph's custom
stream (`{"type": "plan" | "score" | "revise" | "token" | "status" | "done", ...}`) as it happens: the
realizer's text deltas leave as `token` events while the realizer is still generating. Node functions never
hold models in state.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from langgraph.config import get_stream_writer
from langgraph.runtime import Runtime

from hybrid import prompts
from hybrid.state import HybridContext, HybridState
from planners.planner import PlanResult
from planners.revise import select_remask_span
from planners.trajectory import Trajectory
from planners.tse import TSEConfig, score_trajectory


def _writer():
    try:
        return get_stream_writer()
    except Exception:  # noqa: BLE001 - called outside a graph run (e.g. a unit test of a node): no stream
        return lambda _event: None


def _mode(state: HybridState, ctx: HybridContext) -> str:
    return state.mode or ctx.config.mode


def _draft_dict(result: PlanResult) -> dict[str, Any]:
    return {
        "plan": result.text,
        "plan_tokens": result.tokens,
        "plan_span": result.span,
        "prompt_ids": result.prompt_ids,
        "trajectory": result.trajectory.to_dict() if result.trajectory else None,
        "plan_stats": result.stats,
    }


def _result_from_state(state: HybridState) -> PlanResult:
    traj = Trajectory.from_dict(state.trajectory) if state.trajectory else None
    return PlanResult(
        state.plan or "", state.plan_tokens, state.prompt_ids, traj, state.plan_stats, span=state.plan_span
    )


# ----------------------------------------------------------------------------------------------- begin
def begin(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    """Start a turn: clear what the previous turn of a persisted conversation left (everything but the
    history) and stamp the start time that plan latency and TTFT are measured from."""
    mode = _mode(state, runtime.context)
    return {
        "mode": mode,
        "plan": None,
        "plan_tokens": [],
        "plan_span": [],
        "prompt_ids": [],
        "trajectory": None,
        "plan_stats": {},
        "score": None,
        "tse": None,
        "revisions": 0,
        "revision_history": [],
        "best": None,
        "accepted": None,
        "answer": "",
        "usage": {},
        "warnings": [],
        "timings": {"started_at": time.time()},
    }


# ----------------------------------------------------------------------------------------------- plan
def _length_overrides(ctx: HybridContext, mode: str) -> dict[str, int]:
    """Diffusion mode writes the whole answer: planner.answer_length tokens, steps scaled to match."""
    p = ctx.config.planner
    if mode != "diffusion":
        return {}
    return {"gen_length": p.answer_length, "steps": max(1, p.steps * p.answer_length // p.gen_length)}


def _planner_messages(state: HybridState, mode: str) -> list[dict[str, str]]:
    """What the planner is asked: the answer itself in diffusion mode, else the plan."""
    make = prompts.answer_messages if mode == "diffusion" else prompts.plan_messages
    return make(state.question, state.history)


async def plan(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    ctx = runtime.context
    write = _writer()
    mode = _mode(state, ctx)
    started = state.timings.get("started_at") or time.time()
    t0 = time.time()
    messages = _planner_messages(state, mode)
    write({"type": "status", "stage": "plan", "mode": mode})
    result: PlanResult = await asyncio.to_thread(ctx.planner.plan, messages, **_length_overrides(ctx, mode))
    plan_ms = (time.time() - t0) * 1000
    write({"type": "plan", "text": result.text, "nfe": result.stats.get("nfe"), "plan_ms": plan_ms})
    return {
        **_draft_dict(result),
        "timings": {
            **state.timings,
            "started_at": started,
            "plan_ms": plan_ms,
            "nfe": float(result.stats.get("nfe", 0)),
        },
    }


# ----------------------------------------------------------------------------------------------- score
def _tse_config(ctx: HybridContext) -> TSEConfig:
    s = ctx.config.score
    return TSEConfig(
        skip_ratio=s.skip_ratio,
        weighting=s.weighting,
        alpha=s.alpha,
        extractor=s.extractor,
        clusterer=s.clusterer,
        threshold=s.similarity,
    )


async def score(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    ctx = runtime.context
    t0 = time.time()
    if not state.trajectory or not state.trajectory.get("steps"):
        summary: dict[str, Any] = {"tse": 0.0, "n_steps": 0, "note": "no trajectory recorded"}
    else:
        traj = Trajectory.from_dict(state.trajectory)
        s = await asyncio.to_thread(score_trajectory, traj, ctx.planner.decode, _tse_config(ctx), embed=ctx.embed)
        summary = {
            "tse": s.tse,
            "vote": s.vote,
            "vote_share": s.vote_share,
            "flip_rate": s.flip_rate,
            "mean_entropy": s.mean_entropy,
            "n_clusters": s.n_clusters,
            "n_steps": s.n_steps,
            "n_used": s.n_used,
        }
    tse = float(summary["tse"])
    draft = {**_draft_dict(_result_from_state(state)), "tse": tse, "score": summary}
    best = state.best if state.best is not None and state.best["tse"] <= tse else draft  # ties keep the earlier
    accepted = tse <= ctx.config.score.tse_threshold
    timings = dict(state.timings)
    timings["score_ms"] = timings.get("score_ms", 0.0) + (time.time() - t0) * 1000
    _writer()({"type": "score", "tse": tse, "accepted": accepted, "revision": state.revisions, **summary})
    return {"score": summary, "tse": tse, "best": best, "accepted": accepted, "timings": timings}


def route_after_score(state: HybridState, runtime: Runtime[HybridContext]) -> Literal["revise", "realize"]:
    """realize: TSE <= threshold (accepted), or the revision budget is spent (the best draft goes on,
    flagged); revise: otherwise."""
    if state.accepted:
        return "realize"
    if state.revisions < runtime.context.config.revise.max_revisions:
        return "revise"
    return "realize"


# ----------------------------------------------------------------------------------------------- revise
async def revise(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    ctx = runtime.context
    cfg = ctx.config.revise
    best = state.best or _draft_dict(_result_from_state(state))
    t0 = time.time()
    previous = PlanResult(
        best["plan"],
        best["plan_tokens"],
        best["prompt_ids"],
        Trajectory.from_dict(best["trajectory"]) if best.get("trajectory") else None,
        best.get("plan_stats", {}),
        span=best["plan_span"],
    )
    if cfg.mode == "resample" or previous.trajectory is None:
        seed = (ctx.planner.sampler.seed or 0) + state.revisions + 1
        mode = _mode(state, ctx)
        messages = _planner_messages(state, mode)
        temperature = max(ctx.planner.sampler.temperature, 0.7)
        result = await asyncio.to_thread(
            ctx.planner.plan, messages, seed=seed, temperature=temperature, **_length_overrides(ctx, mode)
        )
        positions: list[int] = list(range(len(result.span)))
    else:
        positions = select_remask_span(
            previous.trajectory, cfg.fraction, cfg.rule, stop_ids=set(ctx.planner.model.config.stop_ids)
        )
        result = await asyncio.to_thread(ctx.planner.redraw, previous, positions)
    ms = (time.time() - t0) * 1000
    attempt = {
        "revision": state.revisions + 1,
        "mode": cfg.mode,
        "positions": positions,
        "previous_tse": best.get("tse"),
        "nfe": result.stats.get("nfe"),
        "ms": ms,
    }
    timings = dict(state.timings)
    timings["plan_ms"] = timings.get("plan_ms", 0.0) + ms
    timings["nfe"] = timings.get("nfe", 0.0) + float(result.stats.get("nfe", 0))
    _writer()({"type": "revise", "revision": state.revisions + 1, "positions": len(positions), "text": result.text})
    return {
        **_draft_dict(result),
        "revisions": state.revisions + 1,
        "revision_history": [*state.revision_history, attempt],
        "timings": timings,
    }


# ----------------------------------------------------------------------------------------------- realize
async def realize(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    from realizers.base import Completion, SamplingParams, TextDelta

    ctx = runtime.context
    write = _writer()
    mode = _mode(state, ctx)
    timings = dict(state.timings)
    started = timings.get("started_at") or time.time()
    timings.setdefault("started_at", started)
    warnings = list(state.warnings)
    plan_text = state.plan
    if mode != "ar" and state.best is not None and not state.accepted:
        plan_text = state.best["plan"]  # budget spent: hand on the best-scoring draft, flagged
        warnings.append(
            f"plan not accepted: TSE {state.best['tse']:.3f} > {ctx.config.score.tse_threshold} "
            f"after {state.revisions} revision(s); using the best draft"
        )
    tse = state.best["tse"] if (state.best is not None and not state.accepted) else state.tse
    write(
        {
            "type": "status",
            "stage": "realize",
            "mode": mode,
            "plan": plan_text if mode == "hybrid" else None,
            "tse": tse,
            "revisions": state.revisions,
            "accepted": state.accepted,
        }
    )
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    first: float | None = None
    t_real = time.time()
    if mode == "diffusion":
        # the planner's text is the answer: stream it in word-sized pieces for the same output shape
        text = plan_text or ""
        for i, word in enumerate(text.split(" ")):
            piece = word if i == 0 else " " + word
            if first is None:
                first = time.time()
            pieces.append(piece)
            write({"type": "token", "text": piece})
        usage = {"completion_tokens": len(state.plan_tokens), "source": "planner"}
    else:
        r = ctx.config.realizer
        params = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
        messages = prompts.realizer_messages(state.question, plan_text if mode == "hybrid" else None, state.history)
        async for ev in ctx.realizer.astream(messages, params):
            if isinstance(ev, TextDelta):
                if not ev.text:
                    continue
                if first is None:
                    first = time.time()
                pieces.append(ev.text)
                write({"type": "token", "text": ev.text})
            elif isinstance(ev, Completion):
                usage = {
                    "prompt_tokens": ev.usage.prompt_tokens,
                    "completion_tokens": ev.usage.completion_tokens,
                    "source": ev.usage.source,
                    "finish_reason": ev.finish_reason,
                }
    end = time.time()
    answer = "".join(pieces).strip()
    n_tokens = int(usage.get("completion_tokens") or 0)
    timings["ttft_ms"] = ((first or end) - started) * 1000
    timings["realize_ms"] = (end - t_real) * 1000
    timings["total_ms"] = (end - started) * 1000
    gen_s = end - (first or end)
    timings["tokens_per_s"] = (n_tokens - 1) / gen_s if n_tokens > 1 and gen_s > 0 else 0.0
    write({"type": "done", "timings": timings})
    return {
        "answer": answer,
        "plan": plan_text if mode != "ar" else None,
        "usage": usage,
        "timings": timings,
        "warnings": warnings,
        "history": [{"role": "user", "content": state.question}, {"role": "assistant", "content": answer}],
    }


def route_start(state: HybridState, runtime: Runtime[HybridContext]) -> Literal["plan", "realize"]:
    """plan: hybrid and diffusion modes; realize: ar mode (the realizer answers alone)."""
    return "realize" if _mode(state, runtime.context) == "ar" else "plan"
