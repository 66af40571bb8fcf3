"""benchmarks/bench_tse.py: the AUROC (Mann-Whitney U, ties as 1/2), the word-problem generator, the bootstrap,
and the --smoke path end to end on a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tse.py"
_spec = importlib.util.spec_from_file_location("bench_tse", _PATH)
bt = importlib.util.module_from_spec(_spec)
sys.modules["bench_tse"] = bt  # dataclasses look their module up while the class is built
_spec.loader.exec_module(bt)


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


# ----------------------------------------------------------------------------------------- problem set

_NUM = re.compile(r"\d+")


def test_problems_answers_are_correct():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    probs = [p for s in range(5) for p in bt.make_problems(200, seed=s)]
    assert {p.op for p in probs} == {"+", "-", "*"}
    for p in probs:
        nums = [int(x) for x in _NUM.findall(p.question)]
        assert nums == [p.a, p.b], p.question  # the operands, stated once each, in order
        assert p.answer == ops[p.op](p.a, p.b)
        assert p.answer > 0
        if p.op == "*":
            assert 2 <= p.a <= 9 and 2 <= p.b <= 9
        else:
            assert 2 <= p.a <= 50 and 2 <= p.b <= 50
        assert p.question.endswith("?")


def test_problems_deterministic_by_seed():
    assert bt.make_problems(30, seed=3) == bt.make_problems(30, seed=3)
    assert bt.make_problems(30, seed=3) != bt.make_problems(30, seed=4)
    assert bt.make_problems(10, seed=3) == bt.make_problems(30, seed=3)[:10]


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


def _item(correct: bool, tse: float, final: str | None = "5") -> dict:
    return {"final_correct": correct, "vote_correct": correct, "oracle_correct": correct, "mentioned": correct,
            "final": final, "tse": tse, "flip_rate": 0.0, "mean_entropy": None}  # fmt: skip


def test_summarise_auroc_of_wrong_answers():
    items = [_item(True, 0.0), _item(True, 0.2), _item(False, 1.0), _item(False, 2.0, final=None)]
    s = bt.summarise(items)
    assert s["final_acc"] == 0.5 and s["n_wrong"] == 2
    assert s["auroc_tse"] == 1.0  # high TSE flags the wrong ones
    assert s["auroc_tse_parsed"] == 1.0  # among the three that ended in a number
    assert s["auroc_flip_rate"] == 0.5  # constant signal: all ties
    assert s["auroc_mean_entropy"] is None  # never recorded
    assert bt.summarise([_item(True, 0.3)])["auroc_tse"] is None


def test_mentions_matches_whole_numbers_only():
    assert bt.mentions("6 x 2 = 12 marbles", "12")
    assert not bt.mentions("there are 120 marbles", "12")
    assert bt.mentions("1,234 apples", "1234")
    assert not bt.mentions("no numbers here", "5")


# ------------------------------------------------------------------------------------------------ smoke


@pytest.mark.slow
def test_smoke_runs_and_prints_json_last(capsys, tmp_path):
    out = tmp_path / "r.json"
    res = bt.main(["--smoke", "--no-progress", "--bootstrap", "20", "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["pooled"]["n"] == res["pooled"]["n"] == 8
    full = json.loads(out.read_text())
    assert len(full["items"]) == 8
    assert all(len(it["step_answers"]) == it["n_steps"] == 16 for it in full["items"])
