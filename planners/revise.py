"""The revise policy: remask the unstable part of a draft plan, denoise it again, keep the best.

The one place that decides how a draft is revised; the LangGraph node (`hybrid.nodes.revise`) calls
`propose` once per visit, `revise` runs the same attempts in a loop (benchmarks, library use):

- span selection (`select_remask_span`): the positions whose token settled latest or whose confidence is
  lowest, a budgeted fraction of the plan span; never the same positions twice in a row for the same draft
  (`avoid`: the next attempt on an unchanged best draft takes the next-ranked positions);
- per-attempt seeds (`attempt_seed`): attempt i redraws with seed base + i, so sampled attempts differ;
- the infill contract (`check_infill`): a redraw returns the same span length and changes only the
  remasked positions;
- full-span scoring (`compose_trajectory`): a redraw's own trajectory sees the frozen positions fixed from
  step 0, which would read as "perfectly stable" and favour revisions by construction; the candidate is
  scored on a trajectory in which frozen positions replay the history they had in the parent draft and
  redrawn positions carry their new history, on the parent's time axis, so drafts compare fairly.

Stop at the first draft whose score is at or under the threshold; after the budget, the best-scoring draft
is kept with its score (ties keep the earlier one). Never loops forever; never loses the best draft.

Pure logic over callables: no model, no tokenizer. The sampler arrives as ``redraw(tokens_with_masks,
positions, seed)`` (infilling; the caller adds the prompt) or ``resample(seed)`` (a fresh draft), the
scorer as ``score``. Positions are relative to the generation span.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from planners.trajectory import Trajectory

RemaskRule = Literal["latest", "low_confidence", "mixed"]
ReviseMode = Literal["remask", "resample"]


@dataclass
class Draft:
    """One candidate plan: generation-span tokens, the trajectory that made them, and its score (lower = better)."""

    tokens: list[int]
    trajectory: Trajectory | None = None
    score: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # free-form: the TrajectoryScore, text, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "trajectory": self.trajectory.to_dict() if self.trajectory is not None else None,
            "score": None if self.score is None else _json_float(self.score),
            "info": dict(self.info),
        }


@dataclass
class Attempt:
    index: int  # 1-based attempt number (0 is the initial draft, never an Attempt)
    mode: ReviseMode
    positions: list[int]  # remasked positions (empty for resample)
    score: float
    accepted: bool  # score <= threshold
    improved: bool  # became the new best
    nfe: int  # forward passes the redraw spent (from its trajectory, 0 if unknown)
    seconds: float  # wall time of redraw + score
    error: str | None = None  # on_error="record": the exception, and the attempt scored +inf

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["positions"] = list(self.positions)
        d["score"] = _json_float(self.score)
        return d


@dataclass
class ReviseResult:
    best: Draft
    attempts: list[Attempt]
    accepted: bool  # best.score <= threshold
    initial_score: float
    best_attempt: int  # 0 = the initial draft won, else the Attempt.index that produced ``best``

    @property
    def nfe(self) -> int:
        """Forward passes spent by the revisions (the initial draft's are not counted)."""
        return sum(a.nfe for a in self.attempts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "accepted": self.accepted,
            "initial_score": _json_float(self.initial_score),
            "best_attempt": self.best_attempt,
            "nfe": self.nfe,
        }


# ------------------------------------------------------------------------------------------ span selection


def settle_steps(trajectory: Trajectory) -> list[int]:
    """Per position, the last step at which it was committed, remasked, or its x0-hat token changed (-1: never)."""
    last = [-1] * trajectory.gen_length
    prev: list[int] | None = None
    for s in trajectory.steps:
        for p in (*s.committed, *s.remasked):
            last[p] = s.step
        if prev is not None:
            for p, (a, b) in enumerate(zip(prev, s.x0_hat, strict=False)):
                if a != b:
                    last[p] = s.step
        prev = s.x0_hat
    return last


def commit_confidences(trajectory: Trajectory) -> list[float]:
    """Per position, the confidence of its last commit (positions never committed: 0.0, i.e. least confident)."""
    conf = [0.0] * trajectory.gen_length
    for s in trajectory.steps:
        for p, c in zip(s.committed, s.confidences, strict=False):
            conf[p] = float(c)
    return conf


def _rank_latest(cand: list[int], settle: list[int], conf: list[float]) -> list[int]:
    return sorted(cand, key=lambda p: (-settle[p], conf[p], p))


def _rank_low_confidence(cand: list[int], settle: list[int], conf: list[float]) -> list[int]:
    return sorted(cand, key=lambda p: (conf[p], -settle[p], p))


def _rank_mixed(cand: list[int], settle: list[int], conf: list[float]) -> list[int]:
    """Alternate picks from the two rankings (latest first), without repeats."""
    a, b = _rank_latest(cand, settle, conf), _rank_low_confidence(cand, settle, conf)
    out: list[int] = []
    seen: set[int] = set()
    for pair in zip(a, b, strict=True):
        for p in pair:
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


REMASK_RULES: dict[str, Callable[[list[int], list[int], list[float]], list[int]]] = {
    "latest": _rank_latest,
    "low_confidence": _rank_low_confidence,
    "mixed": _rank_mixed,
}


def plan_span(
    trajectory: Trajectory,
    *,
    protect: Sequence[bool] | None = None,
    stop_ids: Collection[int] = (),
) -> list[int]:
    """Positions that may be remasked: the generation span minus ``protect``ed positions and, if ``stop_ids``
    is given, everything from the first stop token (EOS / EoT / pad) of ``trajectory.final`` on."""
    n = trajectory.gen_length
    if protect is not None and len(protect) != n:
        raise ValueError(f"protect has {len(protect)} entries for a span of {n}")
    end = next((i for i, t in enumerate(trajectory.final) if t in stop_ids), n) if stop_ids else n
    return [p for p in range(min(end, n)) if protect is None or not protect[p]]


def select_remask_span(
    trajectory: Trajectory,
    fraction: float,
    rule: RemaskRule = "latest",
    min_tokens: int = 1,
    *,
    protect: Sequence[bool] | None = None,
    stop_ids: Collection[int] = (),
    avoid: Collection[int] = (),
) -> list[int]:
    """Positions to remask (sorted): floor(fraction * |span|) of the plan span, at least ``min_tokens``,
    never more than the span, never outside it (see ``plan_span``).

    latest: positions whose x0-hat token settled latest (last commit / remask / change), ties -> lower confidence;
    low_confidence: lowest commit confidence first, ties -> settled later; mixed: alternate the two.
    avoid: the positions the previous attempt on this same draft remasked. They go to the back of the ranking,
    so the result differs from ``avoid`` whenever the span has any other position ([] when it has none).
    """
    rank = REMASK_RULES.get(rule)
    if rank is None:
        raise ValueError(f"unknown remask rule {rule!r}; valid: {', '.join(sorted(REMASK_RULES))}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    cand = plan_span(trajectory, protect=protect, stop_ids=stop_ids)
    k = min(len(cand), max(min_tokens, math.floor(fraction * len(cand) + 1e-9)))
    if k <= 0:
        return []
    ranked = rank(cand, settle_steps(trajectory), commit_confidences(trajectory))
    if avoid:
        bad = set(avoid)
        fresh = [p for p in ranked if p not in bad]
        if not fresh:  # every candidate was just tried: a repeat would only redraw the same thing
            return []
        ranked = fresh + [p for p in ranked if p in bad]
    return sorted(ranked[:k])


def attempt_seed(base: int | None, attempt: int) -> int:
    """The sampler seed of revise attempt ``attempt`` (1-based): base + attempt, so attempts differ."""
    return (base or 0) + attempt


def compose_trajectory(parent: Trajectory, child: Trajectory, positions: Collection[int]) -> Trajectory:
    """The full-span trajectory of a redraw, for fair scoring (a new object; inputs are not modified).

    On the parent's time axis (its T steps), step i takes the parent's x0-hat at frozen positions and the
    child's x0-hat at redrawn ``positions`` (child step floor(i * T_child / T)); commits and confidences are
    the parent's for frozen positions and the child's for redrawn ones; the per-step mean entropy mixes the
    two in proportion to the positions each covers. ``final`` and ``nfe`` are the child's (the redraw's cost).
    """
    from planners.trajectory import TrajectoryStep

    if parent.gen_length != child.gen_length:
        raise ValueError(f"parent span {parent.gen_length} != child span {child.gen_length}")
    if not parent.steps or not child.steps:
        return child
    redrawn = set(positions)
    n, T, Tc = parent.gen_length, len(parent.steps), len(child.steps)
    share = len(redrawn) / max(1, n)
    steps: list[TrajectoryStep] = []
    seen_child = -1
    for i, ps in enumerate(parent.steps):
        j = min(Tc - 1, i * Tc // T)
        cs = child.steps[j]
        committed = [(p, c) for p, c in zip(ps.committed, ps.confidences, strict=False) if p not in redrawn]
        if i == T - 1:
            new = range(seen_child + 1, Tc)  # the child's remaining steps land on the last step
        else:
            new = range(seen_child + 1, j + 1)
        for k in new:
            s = child.steps[k]
            committed += [(p, c) for p, c in zip(s.committed, s.confidences, strict=False) if p in redrawn]
        seen_child = max(seen_child, new[-1] if len(new) else seen_child)
        x0 = [cs.x0_hat[p] if p in redrawn else ps.x0_hat[p] for p in range(n)]
        me = None
        if ps.mean_entropy is not None and cs.mean_entropy is not None:
            me = (1 - share) * ps.mean_entropy + share * cs.mean_entropy
        else:
            me = ps.mean_entropy if cs.mean_entropy is None else cs.mean_entropy
        steps.append(
            TrajectoryStep(
                step=i,
                block=ps.block,
                committed=[p for p, _ in committed],
                confidences=[c for _, c in committed],
                x0_hat=x0,
                masked_after=ps.masked_after,
                mean_entropy=me,
                seconds=ps.seconds,
            )
        )
    meta = {**child.meta, "composed_from_parent": True, "redrawn": sorted(redrawn)}
    return Trajectory(parent.prompt_length, n, child.mask_id, steps, list(child.final), child.nfe, meta)


def apply_mask(tokens: Sequence[int], positions: Sequence[int], mask_id: int) -> list[int]:
    """A new list: ``tokens`` with ``mask_id`` at ``positions`` (the input is not modified)."""
    out = list(tokens)
    for p in positions:
        out[p] = mask_id
    return out


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class Proposal:
    """One revise attempt before scoring: the candidate draft (None: nothing left to remask), what it cost."""

    draft: Draft | None
    positions: list[int]  # remasked positions (empty for resample)
    seed: int


def propose(
    best: Draft,
    attempt: int,
    *,
    redraw: Callable[[list[int], list[int], int], Draft] | None = None,
    resample: Callable[[int], Draft] | None = None,
    mode: ReviseMode = "remask",
    fraction: float = 0.25,
    rule: RemaskRule = "latest",
    min_tokens: int = 1,
    mask_id: int | None = None,
    protect: Sequence[bool] | None = None,
    stop_ids: Collection[int] = (),
    avoid: Collection[int] = (),
    seed: int | None = 0,
) -> Proposal:
    """Attempt number ``attempt`` (1-based) on ``best``: pick positions (never ``avoid`` again while anything
    else is left), redraw them with seed ``attempt_seed(seed, attempt)``, check the infill contract, and give
    the candidate the full-span trajectory (``compose_trajectory``) it is scored on. Unscored."""
    s = attempt_seed(seed, attempt)
    if mode == "resample":
        if resample is None:
            raise ValueError("mode='resample' needs a resample callable")
        return Proposal(resample(s), [], s)
    if mode != "remask":
        raise ValueError(f"unknown revise mode {mode!r}; valid: remask, resample")
    if redraw is None:
        raise ValueError("mode='remask' needs a redraw callable")
    if best.trajectory is None:
        raise ValueError("mode='remask' needs the draft's trajectory to choose positions")
    mask_id = best.trajectory.mask_id if mask_id is None else mask_id
    positions = select_remask_span(
        best.trajectory, fraction, rule, min_tokens, protect=protect, stop_ids=stop_ids, avoid=avoid
    )
    if not positions:
        return Proposal(None, [], s)
    cand = redraw(apply_mask(best.tokens, positions, mask_id), list(positions), s)
    check_infill(best.tokens, cand.tokens, positions)
    if cand.trajectory is not None:
        cand.trajectory = compose_trajectory(best.trajectory, cand.trajectory, positions)
    return Proposal(cand, list(positions), s)


def revise(
    draft: Draft,
    *,
    score: Callable[[Draft], float],
    threshold: float,
    max_attempts: int,
    redraw: Callable[[list[int], list[int], int], Draft] | None = None,
    resample: Callable[[int], Draft] | None = None,
    mode: ReviseMode = "remask",
    fraction: float = 0.25,
    rule: RemaskRule = "latest",
    min_tokens: int = 1,
    mask_id: int | None = None,
    protect: Sequence[bool] | None = None,
    stop_ids: Collection[int] = (),
    on_error: Literal["raise", "record"] = "raise",
    seed: int | None = 0,
) -> ReviseResult:
    """Revise ``draft`` until a score <= ``threshold`` or ``max_attempts`` redraws are spent (``propose`` each).

    mode="remask": each attempt remasks ``select_remask_span`` of the current best draft's (full-span)
    trajectory and calls ``redraw(tokens_with_masks, positions, seed)``, which must return the same span
    length and change only the remasked positions (checked); an attempt on a best draft that did not change
    avoids the positions the previous attempt took. mode="resample": ``resample(seed)`` draws a fresh draft.
    ``draft.score`` is used if set, else ``score(draft)`` (stored there); each candidate's score is stored on it.
    NaN scores count as +inf. At most ``max_attempts`` calls to redraw/resample, ever; the loop also stops
    when the span leaves nothing to remask. on_error="record" turns a failing attempt into a +inf score.
    """
    if max_attempts < 0:
        raise ValueError(f"max_attempts must be >= 0, got {max_attempts}")
    if mode == "remask":
        if redraw is None:
            raise ValueError("mode='remask' needs a redraw callable")
        if draft.trajectory is None:
            raise ValueError("mode='remask' needs the draft's trajectory to choose positions")
        if len(draft.tokens) != draft.trajectory.gen_length:
            raise ValueError(f"draft has {len(draft.tokens)} tokens for a span of {draft.trajectory.gen_length}")
    elif mode == "resample":
        if resample is None:
            raise ValueError("mode='resample' needs a resample callable")
    else:
        raise ValueError(f"unknown revise mode {mode!r}; valid: remask, resample")
    if on_error not in ("raise", "record"):
        raise ValueError(f"unknown on_error {on_error!r}; valid: raise, record")

    if draft.score is None:
        draft.score = _clean(score(draft))
    initial = _clean(draft.score)
    best, best_attempt = draft, 0
    attempts: list[Attempt] = []
    avoid: list[int] = []  # positions of the last attempt, while the best draft stays the same

    for i in range(1, max_attempts + 1):
        if _clean(best.score) <= threshold:
            break
        t0 = time.perf_counter()
        cand: Draft | None = None
        positions: list[int] = []
        error = None
        try:
            prop = propose(
                best, i, redraw=redraw, resample=resample, mode=mode, fraction=fraction, rule=rule,
                min_tokens=min_tokens, mask_id=mask_id, protect=protect, stop_ids=stop_ids, avoid=avoid, seed=seed,
            )  # fmt: skip
            if prop.draft is None:  # nothing left to revise: another redraw could only repeat a draft
                break
            cand, positions = prop.draft, prop.positions
            cand.score = _clean(score(cand))
            s = cand.score
        except Exception as e:
            if on_error == "raise":
                raise
            cand, s, error = None, math.inf, f"{type(e).__name__}: {e}"
        improved = cand is not None and s < _clean(best.score)  # strict: a tie keeps the earlier draft
        if improved:
            best, best_attempt = cand, i
        avoid = [] if improved else list(positions)
        nfe = cand.trajectory.nfe if cand is not None and cand.trajectory is not None else 0
        attempts.append(Attempt(i, mode, positions, s, s <= threshold, improved, nfe, time.perf_counter() - t0, error))

    return ReviseResult(
        best=best,
        attempts=attempts,
        accepted=_clean(best.score) <= threshold,
        initial_score=initial,
        best_attempt=best_attempt,
    )


def check_infill(before: Sequence[int], after: Sequence[int], positions: Sequence[int]) -> None:
    """The redraw contract: same span length, and only the remasked positions may change."""
    if len(after) != len(before):
        raise ValueError(f"redraw returned {len(after)} tokens for a span of {len(before)}")
    free = set(positions)
    changed = [p for p, (a, b) in enumerate(zip(before, after, strict=True)) if a != b and p not in free]
    if changed:
        raise ValueError(f"redraw changed fixed positions {changed[:8]}")


def _clean(x: float | None) -> float:
    """None / NaN -> +inf, so an unscored or broken draft never wins."""
    if x is None:
        return math.inf
    x = float(x)
    return math.inf if math.isnan(x) else x


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
