"""The revise loop: remask the unstable part of a draft plan, denoise it again, keep the best.

DESIGN.md, "Revise loop": when a draft's score (TSE; lower is better) is above the threshold, remask the
positions whose token settled latest or whose confidence is lowest (a budgeted fraction of the plan
span), redraw them with the rest fixed, re-score; stop at the first draft at or under the threshold,
and after the budget hand on the best-scoring draft with its score. Never loops forever; never loses
the best draft (ties keep the earlier one).

Pure logic over callables: no model, no tokenizer. The sampler arrives as ``redraw`` (infilling: the
generation span with mask ids at the remasked positions; the caller adds the prompt) or ``resample``
(a fresh draft from scratch), the scorer as ``score``. Positions are relative to the generation span.
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
) -> list[int]:
    """Positions to remask (sorted): floor(fraction * |span|) of the plan span, at least ``min_tokens``,
    never more than the span, never outside it (see ``plan_span``).

    latest: positions whose x0-hat token settled latest (last commit / remask / change), ties -> lower confidence;
    low_confidence: lowest commit confidence first, ties -> settled later; mixed: alternate the two.
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
    return sorted(rank(cand, settle_steps(trajectory), commit_confidences(trajectory))[:k])


def apply_mask(tokens: Sequence[int], positions: Sequence[int], mask_id: int) -> list[int]:
    """A new list: ``tokens`` with ``mask_id`` at ``positions`` (the input is not modified)."""
    out = list(tokens)
    for p in positions:
        out[p] = mask_id
    return out


# ---------------------------------------------------------------------------------------------- the loop


def revise(
    draft: Draft,
    *,
    score: Callable[[Draft], float],
    threshold: float,
    max_attempts: int,
    redraw: Callable[[list[int], list[int]], Draft] | None = None,
    resample: Callable[[], Draft] | None = None,
    mode: ReviseMode = "remask",
    fraction: float = 0.25,
    rule: RemaskRule = "latest",
    min_tokens: int = 1,
    mask_id: int | None = None,
    protect: Sequence[bool] | None = None,
    stop_ids: Collection[int] = (),
    on_error: Literal["raise", "record"] = "raise",
) -> ReviseResult:
    """Revise ``draft`` until a score <= ``threshold`` or ``max_attempts`` redraws are spent.

    mode="remask": each attempt remasks ``select_remask_span(best.trajectory, ...)`` of the current best draft
    (falling back to the initial draft's trajectory when the best has none) and calls
    ``redraw(tokens_with_masks, positions)``, which must return the same span length and change only the
    remasked positions (checked); mode="resample": ``resample()`` draws a fresh draft.
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
        mask_id = draft.trajectory.mask_id if mask_id is None else mask_id
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

    for i in range(1, max_attempts + 1):
        if _clean(best.score) <= threshold:
            break
        t0 = time.perf_counter()
        positions: list[int] = []
        if mode == "remask":
            traj = best.trajectory or draft.trajectory
            assert traj is not None and mask_id is not None
            positions = select_remask_span(traj, fraction, rule, min_tokens, protect=protect, stop_ids=stop_ids)
            if not positions:  # nothing left to revise: another redraw could only repeat the draft
                break
        cand: Draft | None = None
        error = None
        try:
            if mode == "remask":
                assert redraw is not None and mask_id is not None
                cand = redraw(apply_mask(best.tokens, positions, mask_id), list(positions))
                _check_infill(best.tokens, cand.tokens, positions)
            else:
                assert resample is not None
                cand = resample()
            cand.score = _clean(score(cand))
            s = cand.score
        except Exception as e:
            if on_error == "raise":
                raise
            cand, s, error = None, math.inf, f"{type(e).__name__}: {e}"
        improved = cand is not None and s < _clean(best.score)  # strict: a tie keeps the earlier draft
        if improved:
            best, best_attempt = cand, i
        nfe = cand.trajectory.nfe if cand is not None and cand.trajectory is not None else 0
        attempts.append(Attempt(i, mode, positions, s, s <= threshold, improved, nfe, time.perf_counter() - t0, error))

    return ReviseResult(
        best=best,
        attempts=attempts,
        accepted=_clean(best.score) <= threshold,
        initial_score=initial,
        best_attempt=best_attempt,
    )


def _check_infill(before: Sequence[int], after: Sequence[int], positions: Sequence[int]) -> None:
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
