"""benchmarks/bench_commit_ceiling.py: the oracle commit rule commits exactly the masked positions whose argmax
is the reference's token (the top-1 position when none is), and the benchmark runs end to end on the shipped
planner (torch engine, one prompt, 16-token plans) with the rows ordered as the ceiling says they must be."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

bc = load_benchmark("bench_commit_ceiling")


def _inputs(tokens, masked, score, span_offset):
    from kernels.sampling_stats import TokenStats
    from planners.strategies import CommitInputs

    tok = torch.tensor(tokens)
    z = torch.zeros(tok.shape)
    m = torch.tensor(masked)
    sc = torch.where(m, torch.tensor(score, dtype=torch.float32), float("-inf"))
    return CommitInputs(sc, sc, z, m, None, 0.9, 0.1, stats=TokenStats(tok, z, z, z), span_offset=span_offset)


def test_oracle_commits_the_hits_or_the_top1():
    ref = torch.tensor([[10, 11, 12, 13, 20, 21, 22, 23]])  # the reference span, blocks of 4
    rule = bc.oracle_rule(ref)
    # second block (offset 4): positions 0 and 2 already hold the reference's tokens; 1 is not masked
    got = rule(_inputs([[20, 21, 22, 99]], [[True, False, True, True]], [[0.1, 0.9, 0.2, 0.8]], 4))
    assert got.tolist() == [[True, False, True, False]]
    # no hit: the top-1 masked position by score, and only it
    got = rule(_inputs([[1, 2, 3, 4]], [[True, True, True, False]], [[0.1, 0.7, 0.3, 0.9]], 0))
    assert got.tolist() == [[False, True, False, False]]
    with bc.commit_rule_as_learned(rule):
        from planners.strategies import COMMITS

        assert COMMITS["learned"] is rule
    assert COMMITS["learned"] is not rule  # restored


@pytest.mark.slow
def test_benchmark_runs_and_the_rows_are_ordered():
    res = bc.main(["--prompts", "1", "--gen-length", "16", "--engine", "torch_fp32", "--threads", "1", "--no-realizer"])
    rows = {r["row"]: r for r in res["rows"]}
    one, product = rows["one_per_pass"], rows["product"]
    assert one["tokens_per_pass"] <= 1.01  # one commit per pass (fewer passes only if the answer ends)
    assert product["passes"] <= one["passes"]
    for name in ("oracle_vs_one", "oracle_vs_product"):
        assert 2 <= rows[name]["passes"] <= one["passes"], rows[name]  # at most a block of 8 per pass
    assert res["realizer_s"] is None and rows["product"]["plan_over_realizer"] is None
