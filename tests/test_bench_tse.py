"""benchmarks/bench_tse.py: the AUROC (Mann-Whitney U, ties as 1/2), the word-problem generator, the bootstrap,
and the --smoke path end to end on a tiny random model."""

from __future__ import annotations

import json
import random

import pytest
from conftest import load_benchmark

bt = load_benchmark("bench_tse")


# ----------------------------------------------------------------------------------------------- AUROC


def test_auroc_perfect_separation_is_one():
    assert bt.auroc([0.1, 0.2, 0.3, 0.8, 0.9], [False, False, False, True, True]) == 1.0


def test_auroc_reversed_is_zero():
    assert bt.auroc([0.9, 0.8, 0.3, 0.2, 0.1], [False, False, False, True, True]) == 0.0


def test_auroc_all_tied_is_half():
    assert bt.auroc([1.0] * 6, [True, False, True, False, False, True]) == 0.5


def test_auroc_empty_class_is_undefined():
    assert bt.auroc([0.1, 0.5, 0.9], [True, True, True]) is None
    assert bt.auroc([0.1, 0.5, 0.9], [False, False, False]) is None
    assert bt.auroc([], []) is None


def test_auroc_partial_ties_count_half():
    # pos {2, 3}, neg {1, 2}: pairs (2>1) 1, (2=2) 1/2, (3>1) 1, (3>2) 1 -> 3.5 / 4
    assert bt.auroc([2, 3, 1, 2], [True, True, False, False]) == pytest.approx(0.875)


def test_auroc_matches_pairwise_definition():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        s = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        y = [rng.random() < 0.4 for _ in range(n)]
        pos = [a for a, b in zip(s, y, strict=True) if b]
        neg = [a for a, b in zip(s, y, strict=True) if not b]
        if not pos or not neg:
            assert bt.auroc(s, y) is None
            continue
        want = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert bt.auroc(s, y) == pytest.approx(want)


def test_auroc_length_mismatch_raises():
    with pytest.raises(ValueError):
        bt.auroc([0.1, 0.2], [True])


# ------------------------------------------------------------------------------------------- summaries


def test_mean_std_skips_undefined():
    assert bt.mean_std([None, None]) == {"mean": None, "std": None, "n": 0}
    d = bt.mean_std([1.0, None, 3.0])
    assert d["n"] == 2 and d["mean"] == 2.0 and d["std"] == pytest.approx(2**0.5)


def test_bootstrap_skips_undefined_resamples():
    items = [(0.1, False)] * 9 + [(0.9, True)]
    ci = bt.bootstrap_ci(items, lambda xs: {"a": bt.auroc([x[0] for x in xs], [x[1] for x in xs])}, n_boot=200)
    assert ci["a"]["value"] == 1.0
    assert 0 < ci["a"]["defined_resamples"] < 200  # resamples without the one positive are undefined
    assert ci["a"]["lo"] == ci["a"]["hi"] == 1.0


def _it(ar: bool, plan: bool, rank0: float | None, attempts=()) -> dict:
    """An item as phase 2 leaves it: AR correctness, the first plan's, its rank, and the best after each attempt."""
    log = [{"best_rank": r, "best_correct": c, "nfe_total": 10 * (k + 1)} for k, (r, c) in enumerate(attempts)]
    return {"ar": {"correct": ar}, "hybrid": {"correct": plan, "rank": rank0, "attempts": log}}


def test_simulate_hands_over_only_trusted_plans():
    items = [
        _it(ar=False, plan=True, rank0=0.1),  # trusted at once, right
        _it(ar=True, plan=False, rank0=0.9, attempts=[(0.8, False), (0.2, True)]),  # trusted after 2 revisions
        _it(ar=True, plan=False, rank0=None, attempts=[(None, False), (None, False)]),  # degenerate: unplanned
    ]
    s = bt.simulate(items, 0.3, budget=2)
    assert s["accuracy"] == 1.0 and s["trusted"] == 2 and s["unplanned"] == 1
    assert s["accuracy_trusted"] == 1.0 and s["ar_accuracy_on_trusted"] == 0.5
    s0 = bt.simulate(items, 0.3, budget=0)  # without revision the second falls back to AR (right too)
    assert s0["trusted"] == 1 and s0["accuracy"] == 1.0 and s0["revision_nfe_mean"] == 0
    never = bt.simulate(items, float("-inf"), budget=2)
    assert never["trusted"] == 0 and never["accuracy"] == pytest.approx(2 / 3)  # = AR alone


def test_calibrate_picks_the_best_threshold():
    items = [_it(False, True, 0.1), _it(True, False, 0.5), _it(True, True, 0.3), _it(False, False, 0.9)]
    t = bt.calibrate(items, budget=0)
    assert t == 0.3  # trusts the two right plans, leaves the wrong one at 0.5 to AR (right)
    assert bt.simulate(items, t, 0)["accuracy"] == 0.75
    cv = bt.cross_validated(items * 3, budget=0)
    assert 0.0 <= cv["accuracy"] <= 1.0 and len(cv["folds"]) == 2


# ------------------------------------------------------------------------------------------------ smoke


@pytest.mark.slow
def test_smoke_runs_and_prints_json_last(capsys, tmp_path):
    out = tmp_path / "r.json"
    res = bt.main(["--smoke", "--no-progress", "--bootstrap", "20", "--out", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == res["n"] == 6
    assert set(last["auroc"]) == {"diffusion", "hybrid"} and last["signal"] in bt.SIGNALS
    full = json.loads(out.read_text())
    assert len(full["items"]) == 6
    for it in full["items"]:
        assert set(it["diffusion"]["signals"]) == set(bt.SIGNALS)
        assert len(it["hybrid"]["attempts"]) <= 2 and "alt" in it
