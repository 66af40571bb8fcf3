"""benchmarks/bench_rules.py: the rule table builds valid sampler configs, and the --smoke path runs end to end on
the shipped planner (2 prompts, 2 tasks, 3 rules, 16-token spans) with the baseline at exactly one token per pass."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

br = load_benchmark("bench_rules")


def test_rule_table_builds_configs():
    from hybrid.config import HybridConfig
    from hybrid.runtime import sampler_config

    hc = HybridConfig.load()
    for mode in ("hybrid", "diffusion"):
        base = sampler_config(hc, mode)
        for name, over in br.RULES.items():
            cfg = br.rule_config(base, over)
            assert cfg.block_length == base.block_length and cfg.cache == base.cache, name
            assert cfg.steps == base.gen_length // over.get("per_pass", 1), name
    assert br.BASELINE in br.RULES and br.DEFAULT in br.RULES
    assert set(br.SMOKE_RULES) <= set(br.RULES) and br.BASELINE in br.SMOKE_RULES


@pytest.mark.slow
def test_smoke_runs_and_reports(capsys, llama_cpp_safe):  # llama.cpp decodes in-process: probe first
    res = br.main(["--smoke", "--no-cosine"])
    assert res["prompts"] == 2 and res["tasks"] == 2
    assert [r["rule"] for r in res["rows"]] == br.SMOKE_RULES
    for key in ("cpu", "loadavg_1m_before_after", "seconds", "product_sampler", "gen_length", "answer_length"):
        assert key in res
    fields = ("tokens_per_pass", "nfe", "ms_per_plan", "x_baseline_speed", "ar_nll", "repeat_rate", "accuracy",
              "answer_tokens_per_pass", "vs_default")  # fmt: skip
    for row in res["rows"]:
        assert "error" not in row, row
        for f in fields:
            assert f in row, (row["rule"], f)
        assert row["tokens_per_pass"] >= 1.0
    base = next(r for r in res["rows"] if r["rule"] == br.BASELINE)
    assert base["tokens_per_pass"] == 1.0 and base["answer_tokens_per_pass"] == 1.0
    assert base["x_baseline_speed"] == 1.0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")  # JSON last
