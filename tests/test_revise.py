"""Revise loop: span selection on hand-built trajectories, and the loop over scripted redraws."""

from __future__ import annotations

import json
import math
import random

import pytest

from planners.revise import (
    Draft,
    apply_mask,
    commit_confidences,
    plan_span,
    revise,
    select_remask_span,
    settle_steps,
)
from planners.trajectory import Trajectory, TrajectoryStep

MASK, EOS = 99, 98


def make_traj(
    commits: list[list[tuple[int, float]]], final: list[int], x0: list[list[int]] | None = None
) -> Trajectory:
    """One step per entry of ``commits`` ((position, confidence) pairs); x0-hat defaults to ``final`` every step."""
    n = len(final)
    steps = [
        TrajectoryStep(
            step=i,
            block=0,
            committed=[p for p, _ in cs],
            confidences=[c for _, c in cs],
            x0_hat=list(x0[i]) if x0 else list(final),
        )
        for i, cs in enumerate(commits)
    ]
    return Trajectory(prompt_length=4, gen_length=n, mask_id=MASK, steps=steps, final=list(final), nfe=len(steps))


# 8 positions; the last two are EOS padding after the answer. Commit order and confidences:
#   step 0: p0 (.99), p1 (.95)   step 1: p2 (.40), p6 (.99), p7 (.99)   step 2: p3 (.90), p4 (.30)   step 3: p5 (.60)
COMMITS = [[(0, 0.99), (1, 0.95)], [(2, 0.40), (6, 0.99), (7, 0.99)], [(3, 0.90), (4, 0.30)], [(5, 0.60)]]
FINAL = [10, 11, 12, 13, 14, 15, EOS, EOS]


def test_settle_steps_and_confidences():
    x0 = [[10, 11, 1, 1, 1, 1, EOS, EOS], [10, 11, 12, 1, 1, 2, EOS, EOS]] + [FINAL] * 2
    t = make_traj(COMMITS, FINAL, x0)
    # p5 committed at step 3; p2's estimate changed at step 1 (== its commit); p4's changed at 2
    assert settle_steps(t) == [0, 0, 1, 2, 2, 3, 1, 1]
    assert commit_confidences(t) == [0.99, 0.95, 0.40, 0.90, 0.30, 0.60, 0.99, 0.99]


def test_latest_rule_picks_the_last_settled_positions():
    t = make_traj(COMMITS, FINAL)
    # settle: p5 (3), p3 & p4 (2, tie -> lower confidence first: p4), p2 (1) ...
    assert select_remask_span(t, 0.5, "latest") == sorted([5, 4, 3, 2])
    assert select_remask_span(t, 0.25, "latest") == [4, 5]
    # x0-hat flipping late counts: p0's estimate changes at step 3 although it was committed at step 0,
    # so it ties with p5 (committed at step 3) and beats p4
    x0 = [FINAL] * 3 + [[77, *FINAL[1:]]]
    assert select_remask_span(make_traj(COMMITS, FINAL, x0), 0.25, "latest") == [0, 5]


def test_low_confidence_and_mixed_rules():
    t = make_traj(COMMITS, FINAL)
    assert select_remask_span(t, 0.25, "low_confidence") == [2, 4]  # .30, .40
    assert select_remask_span(t, 0.375, "low_confidence") == [2, 4, 5]  # + .60
    # mixed alternates: latest p5, low-conf p4, latest p4 (seen), low-conf p2 -> {5, 4, 2}
    assert select_remask_span(t, 0.375, "mixed") == [2, 4, 5]
    with pytest.raises(ValueError, match="latest, low_confidence, mixed"):
        select_remask_span(t, 0.25, "random")  # type: ignore[arg-type]


def test_budget_min_tokens_protect_and_eos_tail():
    t = make_traj(COMMITS, FINAL)
    assert select_remask_span(t, 0.0, "latest", min_tokens=1) == [5]
    assert select_remask_span(t, 0.0, "latest", min_tokens=0) == []
    assert len(select_remask_span(t, 1.0, "latest")) == 8
    assert select_remask_span(t, 0.1, "latest", min_tokens=50) == list(range(8))  # capped at the span
    # EOS padding: with stop_ids the span ends before the first EOS
    assert plan_span(t, stop_ids={EOS}) == [0, 1, 2, 3, 4, 5]
    assert select_remask_span(t, 1.0, "low_confidence", stop_ids={EOS}) == [0, 1, 2, 3, 4, 5]
    # protect: p4 and p5 are off limits; floor(0.5 * 4) = 2 of the remaining {0, 1, 2, 3}
    protect = [False] * 4 + [True] * 4
    assert select_remask_span(t, 0.5, "low_confidence", protect=protect) == [2, 3]
    with pytest.raises(ValueError, match="protect"):
        select_remask_span(t, 0.5, protect=[False])


def test_remask_stays_inside_the_span_on_random_trajectories():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 24)
        order = list(range(n))
        rng.shuffle(order)
        commits, i = [], 0
        while i < n:
            k = rng.randint(1, 3)
            commits.append([(p, rng.random()) for p in order[i : i + k]])
            i += k
        end = rng.randint(0, n)
        final = [rng.randint(0, 50) for _ in range(end)] + [EOS] * (n - end)
        protect = [rng.random() < 0.2 for _ in range(n)]
        t = make_traj(commits, final)
        frac = rng.random()
        for rule in ("latest", "low_confidence", "mixed"):
            pos = select_remask_span(t, frac, rule, protect=protect, stop_ids={EOS})
            span = plan_span(t, protect=protect, stop_ids={EOS})
            assert set(pos) <= set(span) and len(pos) == len(set(pos))
            assert len(pos) == min(len(span), max(1, math.floor(frac * len(span) + 1e-9)))
            assert all(p < end and not protect[p] for p in pos)


def test_apply_mask_copies():
    tokens = [1, 2, 3]
    assert apply_mask(tokens, [0, 2], MASK) == [MASK, 2, MASK] and tokens == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- the loop


class Scripted:
    """redraw / resample stand-in: fills masked positions with the attempt number; scores from a script."""

    def __init__(self, scores: list[float], traj: Trajectory):
        self.scores = list(scores)
        self.calls: list[tuple[list[int], list[int]]] = []
        self.traj = traj
        self.seeds: list[int | None] = []

    def redraw(self, tokens: list[int], positions: list[int], seed: int | None = None) -> Draft:
        self.calls.append((list(tokens), list(positions)))
        self.seeds.append(seed)
        fill = 100 + len(self.calls)
        out = [fill if t == MASK else t for t in tokens]
        return Draft(out, self.traj, info={"n": len(self.calls)})

    def resample(self, seed: int | None = None) -> Draft:
        self.calls.append(([], []))
        self.seeds.append(seed)
        return Draft(list(FINAL), self.traj, info={"n": len(self.calls)})

    def score(self, d: Draft) -> float:
        return self.scores[d.info["n"] - 1]


def initial(score: float | None = 2.0) -> Draft:
    return Draft(list(FINAL), make_traj(COMMITS, FINAL), score=score, info={"n": 0})


def test_never_exceeds_the_budget():
    s = Scripted([1.9, 1.8, 1.7, 1.6, 1.5, 1.4], make_traj(COMMITS, FINAL))
    r = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=3)
    assert len(s.calls) == 3 and len(r.attempts) == 3 and not r.accepted
    assert r.best.score == 1.7 and r.best_attempt == 3 and r.nfe == 3 * 4
    r0 = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=0)
    assert r0.attempts == [] and r0.best.score == 2.0 and len(s.calls) == 3


def test_stops_as_soon_as_accepted():
    s = Scripted([1.5, 0.4, 0.1], make_traj(COMMITS, FINAL))
    r = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=10)
    assert r.accepted and len(s.calls) == 2 and r.best.score == 0.4 and r.best_attempt == 2
    assert [a.accepted for a in r.attempts] == [False, True]
    # already good enough: no redraw at all
    r = revise(initial(0.3), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=10)
    assert r.accepted and r.attempts == [] and len(s.calls) == 2 and r.best_attempt == 0


def test_never_loses_the_best_draft():
    s = Scripted([1.0, 3.0, math.nan, 1.0], make_traj(COMMITS, FINAL))
    r = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=4, fraction=0.25)
    assert r.best.score == 1.0 and r.best_attempt == 1  # worse, NaN and a tie never replace it
    assert r.best.info["n"] == 1 and [a.improved for a in r.attempts] == [True, False, False, False]
    # later attempts remask the best draft, not the last one: the worse draft's fill (102) never shows up
    for tokens, _ in s.calls[2:]:
        assert 102 not in tokens
    assert r.initial_score == 2.0 and not r.accepted
    json.dumps(r.to_dict())


def test_remasks_only_inside_the_span_and_passes_masks():
    s = Scripted([5.0] * 3, make_traj(COMMITS, FINAL))
    protect = [True] + [False] * 7
    revise(
        initial(),
        redraw=s.redraw,
        score=s.score,
        threshold=0.5,
        max_attempts=3,
        fraction=0.5,
        rule="low_confidence",
        protect=protect,
        stop_ids={EOS},
    )
    for tokens, positions in s.calls:
        assert positions and set(positions) <= {1, 2, 3, 4, 5}
        assert [i for i, t in enumerate(tokens) if t == MASK] == positions
        assert tokens[6:] == [EOS, EOS]


def test_scores_the_initial_draft_when_unscored():
    s = Scripted([0.1], make_traj(COMMITS, FINAL))
    r = revise(
        initial(None),
        redraw=s.redraw,
        score=lambda d: 2.0 if d.info["n"] == 0 else s.score(d),
        threshold=1,
        max_attempts=2,
    )
    assert r.initial_score == 2.0 and r.accepted and r.best_attempt == 1


def test_resample_mode_and_argument_checks():
    s = Scripted([3.0, 0.2], make_traj(COMMITS, FINAL))
    r = revise(initial(), resample=s.resample, mode="resample", score=s.score, threshold=0.5, max_attempts=5)
    assert r.accepted and len(s.calls) == 2 and all(a.positions == [] for a in r.attempts)
    with pytest.raises(ValueError, match="redraw"):
        revise(initial(), score=s.score, threshold=0.5, max_attempts=1)
    with pytest.raises(ValueError, match="resample"):
        revise(initial(), mode="resample", score=s.score, threshold=0.5, max_attempts=1)
    with pytest.raises(ValueError, match="trajectory"):
        revise(Draft(list(FINAL)), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=1)


def test_redraw_contract_and_error_recording():
    t = make_traj(COMMITS, FINAL)

    def bad(tokens, positions, seed):  # changes a fixed position
        return Draft([7] * len(tokens), t, info={"n": 1})

    with pytest.raises(ValueError, match="fixed positions"):
        revise(initial(), redraw=bad, score=lambda d: 1.0, threshold=0.5, max_attempts=1)
    calls = []

    def flaky(tokens, positions, seed):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sampler fell over")
        return Draft([1 if x == MASK else x for x in tokens], t, info={"n": 2})

    r = revise(initial(), redraw=flaky, score=lambda d: 0.2, threshold=0.5, max_attempts=3, on_error="record")
    assert r.attempts[0].error == "RuntimeError: sampler fell over" and r.attempts[0].score == math.inf
    assert r.accepted and r.best_attempt == 2 and len(calls) == 2
    json.dumps(r.to_dict())


# ------------------------------------------------------------------- one policy: avoid, seeds, full span


def test_avoid_never_repeats_the_previous_positions():
    t = make_traj(COMMITS, FINAL)
    first = select_remask_span(t, 0.34, "latest", stop_ids={EOS})
    second = select_remask_span(t, 0.34, "latest", stop_ids={EOS}, avoid=first)
    assert first == [4, 5] and second != first and not set(second) & set(first)
    # everything already tried: nothing left (a repeat would redraw the same thing)
    assert select_remask_span(t, 1.0, "latest", stop_ids={EOS}, avoid=range(6)) == []
    # fewer fresh positions than the budget: fresh first, then the best-ranked of the avoided ones
    pos = select_remask_span(t, 0.5, "latest", stop_ids={EOS}, avoid=[1, 2, 3, 4, 5])
    assert 0 in pos and pos != [1, 2, 3, 4, 5][: len(pos)]


def test_attempts_on_an_unchanged_draft_differ_and_have_their_own_seeds():
    s = Scripted([5.0] * 4, make_traj(COMMITS, FINAL))  # nothing ever improves: the best draft stays the same
    r = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=4, stop_ids={EOS}, seed=7)
    positions = [a.positions for a in r.attempts]
    assert len(positions) >= 2
    for a, b in zip(positions, positions[1:], strict=False):
        assert a != b  # never the same positions twice in a row for the same draft
    assert s.seeds == [8, 9, 10, 11][: len(s.seeds)] and len(set(s.seeds)) == len(s.seeds)


def test_an_improving_attempt_resets_the_avoid_list():
    s = Scripted([1.0, 0.9], make_traj(COMMITS, FINAL))
    r = revise(initial(), redraw=s.redraw, score=s.score, threshold=0.5, max_attempts=2, stop_ids={EOS})
    assert [a.improved for a in r.attempts] == [True, True]  # a new best draft: selection starts afresh


def test_compose_trajectory_replays_the_parent_for_frozen_positions():
    from planners.revise import compose_trajectory

    # parent: p0 flips at step 2 (unstable); p1..p3 stable
    parent = make_traj(
        [[(0, 0.5)], [(1, 0.9)], [(2, 0.8)], [(3, 0.7)]],
        [10, 11, 12, 13],
        x0=[[1, 11, 12, 13], [1, 11, 12, 13], [10, 11, 12, 13], [10, 11, 12, 13]],
    )
    # child: a redraw of p3 only, two steps; frozen positions are fixed from its step 0
    child = make_traj([[], [(3, 0.95)]], [10, 11, 12, 20], x0=[[10, 11, 12, 21], [10, 11, 12, 20]])
    comp = compose_trajectory(parent, child, [3])
    assert len(comp.steps) == 4 and comp.final == [10, 11, 12, 20] and comp.nfe == child.nfe
    # frozen p0 keeps its history (the flip), redrawn p3 carries the child's history
    assert [s.x0_hat[0] for s in comp.steps] == [1, 1, 10, 10]
    assert [s.x0_hat[3] for s in comp.steps] == [21, 21, 20, 20]
    # commits: the parent's for frozen positions, the child's for p3 (never the parent's p3 commit)
    conf = commit_confidences(comp)
    assert conf[:3] == [0.5, 0.9, 0.8] and conf[3] == 0.95
    assert parent.steps[0].x0_hat == [1, 11, 12, 13]  # inputs untouched


def test_a_frozen_redraw_does_not_score_as_stable_by_construction():
    """The redraw's own trajectory would score 0 flips on frozen positions; the composed one keeps the
    parent's instability there, so a candidate that changed nothing is not favoured."""
    from planners.revise import compose_trajectory
    from planners.tse import score_trajectory

    x0 = [[1, 2, 3, 4], [5, 2, 3, 4], [1, 2, 3, 4], [5, 2, 3, 4]]
    parent = make_traj([[(0, 0.5)], [(1, 0.5)], [(2, 0.5)], [(3, 0.5)]], [5, 2, 3, 4], x0=x0)
    child = make_traj([[(3, 0.5)]], [5, 2, 3, 4])  # redrew p3 to the same token, one step
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    from planners.tse import TSEConfig

    cfg = TSEConfig(clusterer="exact", skip_ratio=0.0)
    alone = score_trajectory(child, decode, cfg).tse
    fair = score_trajectory(compose_trajectory(parent, child, [3]), decode, cfg).tse
    assert alone == 0.0 and fair == pytest.approx(score_trajectory(parent, decode, cfg).tse) and fair > 0
