"""AR-ness (DiffuCoder Appx. A.2) on hand-built trajectories with values worked out by hand, and on a real one."""

from __future__ import annotations

import pytest

from planners.arness import arness, commit_events, decoding_order, global_arness, initially_masked, local_arness
from planners.trajectory import Trajectory, TrajectoryStep


def traj(steps: list[list[int]], gen_length: int = 8, remasked: dict[int, list[int]] | None = None) -> Trajectory:
    remasked = remasked or {}
    return Trajectory(
        prompt_length=5,
        gen_length=gen_length,
        mask_id=0,
        steps=[
            TrajectoryStep(
                step=i,
                block=0,
                committed=list(c),
                confidences=[0.5] * len(c),
                x0_hat=[1] * gen_length,
                remasked=remasked.get(i, []),
            )
            for i, c in enumerate(steps)
        ],
        final=[1] * gen_length,
        nfe=len(steps),
    )


def one_per_step(order: list[int]) -> Trajectory:
    return traj([[p] for p in order], gen_length=len(order))


def test_pure_ar_is_one_for_every_k():
    t = one_per_step(list(range(8)))
    for k in (1, 2, 3, 8):
        assert local_arness(t, k) == 1.0
        assert global_arness(t, k) == 1.0


def test_reverse_order():
    t = one_per_step(list(range(7, -1, -1)))
    # local: no position ever follows its left neighbour (the first, 7, follows the prompt's -1)
    assert local_arness(t) == 0.0
    # global: only the last commit (position 0, the only mask left) takes the leftmost mask
    assert global_arness(t) == pytest.approx(1 / 8)
    # global@k: ranks are 7,6,...,0 -> rank < 4 for the last four commits
    assert global_arness(t, 4) == pytest.approx(4 / 8)


def test_swap_set_definition_and_k():
    t = one_per_step([0, 2, 1, 3])
    # k=1: 0 follows the prompt (hit); 2 after 0, 1 after 2, 3 after 1: misses
    assert local_arness(t, 1) == pytest.approx(1 / 4)
    # k=2 (set equality, Appx. A.2): t1 {-2,-1}={-2,-1} hit; t2 {-1,0} vs {0,1} miss; t3 {0,2} vs {-1,0} miss;
    # t4 {2,1} = {1,2} hit
    assert local_arness(t, 2) == pytest.approx(2 / 4)
    # global@1: 0 first of {0,1,2,3}; 2 is not first of {1,2,3}; 1 first of {1,3}; 3 first of {3}
    assert global_arness(t, 1) == pytest.approx(3 / 4)
    assert global_arness(t, 2) == 1.0
    assert [e.rank for e in commit_events(t)] == [0, 1, 0, 0]


def test_parallel_contiguous_blocks_count_as_ar():
    t = traj([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert decoding_order(t) == list(range(8))
    assert arness(t) == {"local": 1.0, "global": 1.0, "k": 1, "commits": 8}


def test_parallel_strided_commits():
    t = traj([[0, 4], [1, 5], [2, 6], [3, 7]])
    assert decoding_order(t) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert local_arness(t) == pytest.approx(1 / 8)  # only 0 (after the prompt)
    # global: 0 yes; 4 no; 1 yes; 5 no (M={2,3,5,6,7}); 2 yes; 6 no; 3 yes; 7 yes (M={7})
    assert global_arness(t) == pytest.approx(5 / 8)


def test_remask_returns_a_position_to_the_masked_set():
    # step 0: commit 0,1; step 1: commit 2, then remask 1; step 2: commit 1 and 3
    t = traj([[0, 1], [2], [1, 3]], gen_length=4, remasked={1: [1]})
    assert decoding_order(t) == [0, 1, 2, 1, 3]
    # local: 0 (prompt), 1, 2 hits; 1 after 2 miss; 3 after 1 miss
    assert local_arness(t) == pytest.approx(3 / 5)
    # global: every commit takes the leftmost mask (1 is the leftmost again after its remask)
    assert global_arness(t) == 1.0


def test_redraw_only_counts_remasked_positions():
    # a revision redraws positions 3 and 6 of an 8-token span; the rest is held fixed (never committed)
    t = traj([[6], [3]])
    assert initially_masked(t) == [3, 6]
    assert global_arness(t) == pytest.approx(1 / 2)  # 6 is not the leftmost of {3, 6}; 3 then is
    assert local_arness(t) == 0.0


def test_dict_form_empty_and_bad_k():
    t = one_per_step([1, 0])
    assert global_arness(t.to_dict()) == global_arness(t) == pytest.approx(1 / 2)
    empty = traj([])
    assert local_arness(empty) is None and global_arness(empty) is None
    assert arness(None)["local"] is None
    with pytest.raises(ValueError, match="positive integer"):
        local_arness(t, 0)


def test_malformed_record_is_refused():
    with pytest.raises(ValueError, match="committed but not masked"):
        commit_events(traj([[0], [0]]))


def test_real_trajectory(tiny_planner):
    res = tiny_planner.plan("How do I boil an egg?")
    t = res.trajectory
    a = arness(t, 1)
    assert a["commits"] == sum(len(s.committed) for s in t.steps) > 0
    assert 0.0 <= a["local"] <= 1.0 and 0.0 <= a["global"] <= 1.0
    # monotone in k, as the paper notes: local does not rise, global does not fall
    assert local_arness(t, 2) <= local_arness(t, 1)
    assert global_arness(t, 2) >= global_arness(t, 1)
    # every committed position is in the span, each committed once without remasking
    assert sorted(decoding_order(t)) == sorted(initially_masked(t))
