"""The graph's nodes as plain functions over (state, runtime): reuse them in your own LangGraph graphs.

    plan     diffusion planner drafts a plan (hybrid) or the answer itself (diffusion); records the trajectory;
             streams each finished block (`plan_block`; diffusion mode: also as `token`, the answer streams)
    score    temporal semantic entropy of the trajectory (+ vote, flip rate, mean entropy); keeps the best draft
    revise   remasks the least settled part of the plan and denoises it again (or resamples), one attempt per visit
    realize  the AR realizer streams the answer (hybrid: following the plan; ar: alone; diffusion: the plan is
             the answer, already streamed by the plan node)

Every node reads models from `runtime.context` (`HybridContext`) and writes progress to LangGraph's custom
stream (`{"type": "plan_block" | "plan" | "score" | "revise" | "token" | "status" | "done", ...}`) as it happens: the
realizer's text deltas leave as `token` events while the realizer is still generating. Node functions never
hold models in state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal

from langgraph.config import get_stream_writer
from langgraph.runtime import Runtime

from hybrid import prompts
from hybrid.state import HybridContext, HybridState
from planners.planner import PlanProgress, PlanResult
from planners.revise import Draft, propose
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
def _sampler(ctx: HybridContext, mode: str):
    """This request's planner settings, built from its `HybridConfig` (`hybrid.runtime.sampler_config`;
    diffusion mode writes planner.answer_length tokens, steps scaled to match). Never the loaded planner's
    own `sampler`; nothing here mutates the planner."""
    from hybrid.runtime import sampler_config

    return sampler_config(ctx.config, mode)


def _planner_messages(state: HybridState, mode: str) -> list[dict[str, str]]:
    """What the planner is asked: the answer itself in diffusion mode, else the plan."""
    make = prompts.answer_messages if mode == "diffusion" else prompts.plan_messages
    return make(state.question, state.history)


async def plan(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    """Draft the plan (hybrid) or the answer (diffusion). Each block that becomes final leaves at once as a
    `plan_block` event (the text so far and what the block added); in diffusion mode the same text also
    leaves as `token` events, so the answer streams while the planner is still writing it. If the run is
    cancelled, the planner stops after its current block."""
    ctx = runtime.context
    write = _writer()
    mode = _mode(state, ctx)
    started = state.timings.get("started_at") or time.time()
    t0 = time.time()
    messages = _planner_messages(state, mode)
    write({"type": "status", "stage": "plan", "mode": mode})
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()
    streamed: dict[str, float] = {}  # diffusion mode: when the first / last answer text left, and its tokens

    def on_block(p: PlanProgress) -> bool:
        now = time.time()
        event = {"type": "plan_block", "block": p.block, "text": p.text, "delta": p.delta, "tokens": p.tokens}
        event.update(nfe=p.nfe, plan_ms=(now - t0) * 1000, ended=p.ended)
        loop.call_soon_threadsafe(write, event)
        if mode == "diffusion" and p.delta:
            if not streamed:
                streamed.update(first_token_at=now, first_tokens=float(p.tokens))
            streamed.update(last_token_at=now, streamed_tokens=float(p.tokens))
            loop.call_soon_threadsafe(write, {"type": "token", "text": p.delta})
        return cancelled.is_set()

    try:
        result: PlanResult = await asyncio.to_thread(
            ctx.planner.plan, messages, config=_sampler(ctx, mode), on_block=on_block
        )
    except asyncio.CancelledError:
        cancelled.set()  # the worker thread finishes its block and stops
        raise
    plan_ms = (time.time() - t0) * 1000
    write({"type": "plan", "text": result.text, "nfe": result.stats.get("nfe"), "plan_ms": plan_ms})
    return {
        **_draft_dict(result),
        "timings": {
            **state.timings,
            "started_at": started,
            "plan_ms": plan_ms,
            "nfe": float(result.stats.get("nfe", 0)),
            **streamed,
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


def score_summary(traj: Trajectory | None, ctx: HybridContext, *, full: bool = True) -> dict[str, Any]:
    """The `score` dict of a draft: `value` (the configured signal, higher = less trustworthy), `signal`,
    every signal, TSE, the vote, and `degenerate` (why the draft is a repetition loop or near-empty, else None).
    Drafts are compared and accepted on `_rank`: the value, or +inf for a degenerate or unscorable draft.
    `full=False` leaves out what needs the x0-hat texts clustered (TSE, flip rate, vote: None, and
    `deferred` True); the configured signal must not be one of those."""
    from types import SimpleNamespace

    from planners.tse import CLUSTER_SIGNALS, SIGNALS, degeneracy, final_confidence, mean_token_entropy

    s_cfg = ctx.config.score
    if traj is None or not traj.steps:
        return {"tse": 0.0, "value": None, "signal": s_cfg.signal, "degenerate": None, "n_steps": 0,
                "note": "no trajectory recorded"}  # fmt: skip
    stop_ids = list(ctx.planner.model.config.stop_ids)
    end = next((i for i, t in enumerate(traj.final) if t in set(stop_ids)), traj.gen_length)
    degenerate = degeneracy(ctx.planner.decode(traj.final[:end]), min_words=s_cfg.min_words)
    if full:
        s = score_trajectory(traj, ctx.planner.decode, _tse_config(ctx), embed=ctx.embed, stop_ids=stop_ids)
        signals = s.signals()
        parts = {"tse": s.tse, "vote": s.vote, "vote_share": s.vote_share, "flip_rate": s.flip_rate,
                 "mean_entropy": s.mean_entropy, "final_confidence": s.final_confidence, "n_clusters": s.n_clusters,
                 "n_steps": s.n_steps, "n_used": s.n_used}  # fmt: skip
    else:
        if s_cfg.signal in CLUSTER_SIGNALS:
            raise ValueError(f"score.signal {s_cfg.signal!r} needs the clustering: it cannot be deferred")
        # what the trajectory alone gives, through the same signal definitions the full score uses
        s = SimpleNamespace(final_confidence=final_confidence(traj, stop_ids=stop_ids),
                            mean_entropy=mean_token_entropy(traj))  # fmt: skip
        signals = {name: None if name in CLUSTER_SIGNALS else fn(s) for name, fn in SIGNALS.items()}
        parts = {"tse": None, "vote": None, "vote_share": None, "flip_rate": None, "mean_entropy": s.mean_entropy,
                 "final_confidence": s.final_confidence, "n_clusters": None, "n_steps": len(traj.steps),
                 "n_used": None, "deferred": True}  # fmt: skip
    return {"value": signals[s_cfg.signal], "signal": s_cfg.signal, "degenerate": degenerate, "signals": signals,
            **parts}  # fmt: skip


def _rank(summary: dict[str, Any], ctx: HybridContext) -> float:
    """What drafts compare and are accepted on: the value, +inf when undefined or (by default) degenerate."""
    v = summary.get("value")
    if v is None or v != v or (summary.get("degenerate") and ctx.config.score.reject_degenerate):
        return float("inf")
    return float(v)


def _stored(rank: float | None) -> float:
    """A rank as kept in state (None for +inf, so state stays plain JSON)."""
    return float("inf") if rank is None else float(rank)


async def score(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    """Score the current draft, keep the best one so far (lowest rank; ties keep the earlier draft) and
    accept it when its value is at or below `score.threshold` and it is not degenerate."""
    ctx = runtime.context
    t0 = time.time()
    traj = Trajectory.from_dict(state.trajectory) if state.trajectory else None
    summary = await asyncio.to_thread(score_summary, traj, ctx, full=not _deferrable(ctx))
    rank = _rank(summary, ctx)
    threshold = ctx.config.score.accept_at
    summary["threshold"] = threshold
    tse = None if summary["tse"] is None else float(summary["tse"])
    draft = {**_draft_dict(_result_from_state(state)), "tse": tse, "value": summary["value"], "score": summary}
    keep = state.best is not None and _stored(state.best.get("rank")) <= rank  # ties keep the earlier
    best = state.best if keep else {**draft, "rank": None if rank == float("inf") else rank}
    accepted = _stored(best["rank"]) <= threshold
    timings = dict(state.timings)
    timings["score_ms"] = timings.get("score_ms", 0.0) + (time.time() - t0) * 1000
    event = {k: v for k, v in summary.items() if k != "signals"}
    _writer()({"type": "score", "accepted": accepted, "revision": state.revisions, **event})
    return {"score": summary, "tse": tse, "best": best, "accepted": accepted, "timings": timings}


def _deferrable(ctx: HybridContext) -> bool:
    """Whether the score node may leave the clustering signals for after the answer (`score.defer`)."""
    from planners.tse import CLUSTER_SIGNALS

    return ctx.config.score.defer and ctx.config.score.signal not in CLUSTER_SIGNALS


def _complete_scores(state: HybridState, ctx: HybridContext) -> dict[str, Any]:
    """The state updates that fill in deferred scores: the current draft's and the best draft's (TSE, flip
    rate, vote), with the value, rank and acceptance they already had. The best draft is often the current
    one: then it is scored once."""
    out: dict[str, Any] = {}
    current = None
    if state.score and state.score.get("deferred"):
        traj = Trajectory.from_dict(state.trajectory) if state.trajectory else None
        current = {**score_summary(traj, ctx), "threshold": state.score.get("threshold")}
        out["score"], out["tse"] = current, current["tse"]
    best = state.best
    if best is not None and (best.get("score") or {}).get("deferred"):
        if current is not None and best.get("trajectory") == state.trajectory:
            full = current
        else:
            traj = Trajectory.from_dict(best["trajectory"]) if best.get("trajectory") else None
            full = {**score_summary(traj, ctx), "threshold": best["score"].get("threshold")}
        out["best"] = {**best, "score": full, "tse": full["tse"]}
    return out


def route_after_score(state: HybridState, runtime: Runtime[HybridContext]) -> Literal["revise", "realize"]:
    """realize: the best draft is accepted (its value <= score.threshold, not degenerate), or the revision
    budget is spent (hybrid: the realizer then answers alone, flagged unplanned); revise: otherwise.
    Diffusion mode never revises: its answer streamed block by block while it was drafted, and spoken text
    cannot be taken back (the score still flags it)."""
    if state.accepted or _mode(state, runtime.context) == "diffusion":
        return "realize"
    if state.revisions < runtime.context.config.revise.max_revisions:
        return "revise"
    return "realize"


# ----------------------------------------------------------------------------------------------- revise
def _draft_of(d: dict[str, Any]) -> Draft:
    traj = Trajectory.from_dict(d["trajectory"]) if d.get("trajectory") else None
    return Draft(list(d["plan_span"] or d["plan_tokens"]), traj, score=_stored(d.get("rank")), info={"draft": d})


async def revise(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    """One revise attempt per visit, by the policy in `planners.revise.propose` (span selection that never
    repeats the previous attempt's positions on the same draft, a seed per attempt, the infill contract, the
    full-span trajectory the score node then scores). This node only adapts the planner to it."""
    import dataclasses

    ctx = runtime.context
    cfg = ctx.config.revise
    mode = _mode(state, ctx)
    best = state.best or {**_draft_dict(_result_from_state(state)), "rank": None}
    parent = _draft_of(best)
    attempt = state.revisions + 1
    last = state.revision_history[-1] if state.revision_history else None
    avoid = last["positions"] if last and last.get("parent_span") == list(parent.tokens) else []
    base = _sampler(ctx, mode)
    prompt_ids = list(best["prompt_ids"])
    results: dict[str, PlanResult] = {}

    def redraw(_masked: list[int], positions: list[int], seed: int) -> Draft:
        prev = PlanResult(best["plan"], best["plan_tokens"], prompt_ids, None, {}, span=list(parent.tokens))
        c = dataclasses.replace(base, seed=seed, temperature=cfg.temperature)
        r = ctx.planner.redraw(prev, positions, config=c)
        results["r"] = r
        return Draft(list(r.span), r.trajectory)

    def resample(seed: int) -> Draft:
        c = dataclasses.replace(base, seed=seed, temperature=max(base.temperature, 0.7))
        r = ctx.planner.plan(_planner_messages(state, mode), config=c)
        results["r"] = r
        return Draft(list(r.span), r.trajectory)

    rmode = cfg.mode if parent.trajectory is not None else "resample"
    t0 = time.time()
    prop = await asyncio.to_thread(
        propose, parent, attempt, redraw=redraw, resample=resample, mode=rmode, fraction=cfg.fraction,
        rule=cfg.rule, stop_ids=set(ctx.planner.model.config.stop_ids), avoid=avoid, seed=base.seed,
    )  # fmt: skip
    ms = (time.time() - t0) * 1000
    history = {"revision": attempt, "mode": rmode, "positions": prop.positions, "seed": prop.seed,
               "parent_span": list(parent.tokens), "previous_value": best.get("value"), "ms": ms}  # fmt: skip
    if prop.draft is None:  # nothing left to remask: the budget ends here
        _writer()({"type": "revise", "revision": attempt, "positions": 0, "text": best["plan"]})
        return {"revisions": ctx.config.revise.max_revisions, "revision_history": [*state.revision_history, history]}
    r = results["r"]
    history["nfe"] = r.stats.get("nfe")
    timings = dict(state.timings)
    timings["plan_ms"] = timings.get("plan_ms", 0.0) + ms
    timings["nfe"] = timings.get("nfe", 0.0) + float(r.stats.get("nfe", 0))
    _writer()({"type": "revise", "revision": attempt, "positions": len(prop.positions), "text": r.text})
    full = PlanResult(r.text, r.tokens, r.prompt_ids, prop.draft.trajectory, r.stats, span=r.span)
    return {
        **_draft_dict(full),  # the trajectory is the full-span one (compose_trajectory): scored fairly
        "revisions": attempt,
        "revision_history": [*state.revision_history, history],
        "timings": timings,
    }


# ----------------------------------------------------------------------------------------------- realize
def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else str(v)


async def realize(state: HybridState, runtime: Runtime[HybridContext]) -> dict[str, Any]:
    from realizers.base import Completion, SamplingParams, TextDelta

    ctx = runtime.context
    write = _writer()
    mode = _mode(state, ctx)
    timings = dict(state.timings)
    started = timings.get("started_at") or time.time()
    timings.setdefault("started_at", started)
    warnings = list(state.warnings)
    plan_text = state.best["plan"] if (mode != "ar" and state.best is not None) else state.plan  # best = accepted
    if mode != "ar" and state.best is not None and not state.accepted:
        sc = state.best.get("score") or {}
        why = f"degenerate: {sc['degenerate']}" if sc.get("degenerate") else (
            f"{sc.get('signal', 'score')} {_fmt(state.best.get('value'))} > {ctx.config.score.accept_at}"
        )  # fmt: skip
        if mode == "hybrid":  # an untrusted plan is not handed over: the realizer answers alone
            plan_text = None
            warnings.append(
                f"plan not accepted after {state.revisions} revision(s) ({why}): unplanned, the realizer answered alone"
            )
        else:  # diffusion: the draft is the answer; the best one goes out, flagged
            warnings.append(f"answer not accepted after {state.revisions} revision(s) ({why}); best draft")
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
        # the planner's text is the answer and already streamed block by block while it was planned (plan
        # node): TTFT is the first block's time, the rate counts the tokens after it over the real interval
        pieces.append(plan_text or "")
        usage = {"completion_tokens": len(state.plan_tokens), "source": "planner"}
    else:
        r = ctx.config.realizer
        extra = {"repetition_penalty": r.repetition_penalty} if r.repetition_penalty != 1.0 else {}
        params = SamplingParams(
            max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, extra=extra, stop_loops=r.stop_loops
        )
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
    already = 1.0  # tokens that arrived with the first chunk: the rate counts those after it
    if mode == "diffusion" and "first_token_at" in timings:
        first, last = timings["first_token_at"], timings["last_token_at"]
        already = timings.get("first_tokens", 1.0)
    else:
        last = end
    timings["ttft_ms"] = ((first or end) - started) * 1000
    timings["realize_ms"] = (end - t_real) * 1000
    timings["total_ms"] = (end - started) * 1000
    gen_s = last - (first or last)
    timings["tokens_per_s"] = (n_tokens - already) / gen_s if n_tokens > already and gen_s > 0 else 0.0
    write({"type": "done", "timings": timings})
    # scores left for after the answer (score.defer): filled in now, off the time to first token
    t_def = time.time()
    completed = await asyncio.to_thread(_complete_scores, state, ctx) if mode != "ar" else {}
    if completed:
        timings["score_deferred_ms"] = (time.time() - t_def) * 1000
    return {
        **completed,
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
