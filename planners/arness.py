"""AR-ness of a denoising trajectory: how left-to-right a masked-diffusion decode really was.

Definitions (Gong et al. 2025, "DiffuCoder: Understanding and Improving Masked Diffusion Models for Code
Generation", arXiv 2506.20639, Sec. 4.1 and Appx. A.2):
with decoding order p_1, ..., p_T (the position unmasked at step t) and M_{t-1} the positions still masked
just before step t,

    local AR-ness@k  = (1/T) sum_t 1[ {p_{t-1}, ..., p_{t-k}} = {p_t - 1, ..., p_t - k} ]      ("next token")
    global AR-ness@k = (1/T) sum_t 1[ p_t is among the k leftmost positions of M_{t-1} ]       ("earliest mask")

Local: the token just decoded, with the k decoded before it, forms a contiguous left-to-right run. Global
(DiffuCoder: "for each unmasked token, if it is the left-most unmasked token in the sequence, it is considered
autoregressively generated"): the decoder took the first remaining mask. Both are 1 for AR decoding; local
AR-ness does not rise with k, global AR-ness does not fall.

The paper decodes one token per step; our samplers commit several. Conventions here (each is stated where
it is applied):
- Commits of one step are simultaneous; they are serialised left to right (ascending position), so a step
  that commits a contiguous run extending the decoded prefix counts as AR, as the same run emitted by an AR
  model would. T is the number of commit events, not of steps.
- The prompt is decoded before step 1, left to right: p_0 = -1, p_{-1} = -2, ... (positions are relative to
  the generation span), so pure AR decoding scores 1 for every k, as the paper states it must.
- Remasking (`TrajectoryStep.remasked`, applied after the step's commits) returns a position to M; its
  later re-commit is a new event. A position that is never committed (held fixed in a redraw, or filled with
  EOS after an early stop) is not in M: the initial M is the set of positions whose first event is a commit.

Pure functions over a `Trajectory` (or its `to_dict()` form). No model, no tokenizer.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planners.trajectory import Trajectory


@dataclass(frozen=True)
class CommitEvent:
    """One position unmasked; `rank` is its 0-based index among the positions masked just before it."""

    step: int
    position: int
    rank: int


def _as_trajectory(traj: Trajectory | Mapping[str, Any]) -> Trajectory:
    return traj if isinstance(traj, Trajectory) else Trajectory.from_dict(dict(traj))


def initially_masked(traj: Trajectory | Mapping[str, Any]) -> list[int]:
    """Positions masked before step 1: those whose first recorded event is a commit (sorted)."""
    t = _as_trajectory(traj)
    first: dict[int, str] = {}
    for s in t.steps:
        for p in sorted(s.committed):
            first.setdefault(p, "commit")
        for p in s.remasked:
            first.setdefault(p, "remask")
    return sorted(p for p, kind in first.items() if kind == "commit")


def commit_events(traj: Trajectory | Mapping[str, Any]) -> list[CommitEvent]:
    """The decoding order p_1..p_T with each commit's rank in M_{t-1} (see the module docstring)."""
    t = _as_trajectory(traj)
    masked = initially_masked(t)  # sorted list: M_{t-1}
    events: list[CommitEvent] = []
    for s in t.steps:
        for p in sorted(s.committed):  # simultaneous commits, serialised left to right
            i = bisect.bisect_left(masked, p)
            if i == len(masked) or masked[i] != p:  # committed while not masked: a malformed record
                raise ValueError(f"step {s.step}: position {p} committed but not masked")
            events.append(CommitEvent(s.step, p, i))
            masked.pop(i)
        for p in s.remasked:  # remasking is applied after the step's commits
            i = bisect.bisect_left(masked, p)
            if i == len(masked) or masked[i] != p:
                masked.insert(i, p)
    return events


def decoding_order(traj: Trajectory | Mapping[str, Any]) -> list[int]:
    """p_1, ..., p_T: committed positions in commit order (a step's commits left to right)."""
    return [e.position for e in commit_events(traj)]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def local_arness(traj: Trajectory | Mapping[str, Any], k: int = 1) -> float | None:
    """Local AR-ness@k (DiffuCoder Appx. A.2, "NTP@k"): the fraction of commits whose k predecessors in the
    decoding order are exactly the k positions to their left. None if nothing was committed."""
    _check_k(k)
    order = decoding_order(traj)
    if not order:
        return None
    history = [-j for j in range(k, 0, -1)] + order  # the prompt, decoded left to right before step 1
    hits = 0
    for t, p in enumerate(order):
        before = history[t : t + k]  # p_{t-k}, ..., p_{t-1} (history is offset by k)
        hits += set(before) == {p - i for i in range(1, k + 1)}
    return hits / len(order)


def global_arness(traj: Trajectory | Mapping[str, Any], k: int = 1) -> float | None:
    """Global AR-ness@k (DiffuCoder Appx. A.2, "FMS@k"): the fraction of commits that unmask one of the k
    leftmost still-masked positions. None if nothing was committed."""
    _check_k(k)
    events = commit_events(traj)
    if not events:
        return None
    return sum(e.rank < k for e in events) / len(events)


def arness(traj: Trajectory | Mapping[str, Any] | None, k: int = 1) -> dict[str, Any]:
    """Both measures at one k, with the number of commit events: what `hybrid compare` reports."""
    if traj is None:
        return {"local": None, "global": None, "k": k, "commits": 0}
    return {
        "local": local_arness(traj, k),
        "global": global_arness(traj, k),
        "k": k,
        "commits": len(commit_events(traj)),
    }
