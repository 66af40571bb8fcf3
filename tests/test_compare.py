"""`hybrid compare`: the task set, answer checking on hand-made answers, the summary table, and a real sweep of
the three modes (tiny random planner with SmolLM2's tokenizer + the packaged SmolLM2 realizer) writing the
table, CSV, JSON, PNG plots, run states and a viewer page."""

from __future__ import annotations

import asyncio
import csv
import json
import re

import pytest

from hybrid import compare, runtime
from hybrid.compare import Task, check_answer, format_table, load_tasks, summarise
from hybrid.config import HybridConfig
from hybrid.state import HybridContext
from planners.planner import Planner


def test_task_set_is_a_checked_mix():
    tasks = load_tasks()
    assert 25 <= len(tasks) <= 40
    assert len({t.id for t in tasks}) == len(tasks)
    kinds = {t.kind for t in tasks}
    assert {"arithmetic", "factual", "open"} <= kinds
    assert sum(t.checkable for t in tasks) >= 15 and sum(not t.checkable for t in tasks) >= 5
    # the first six (a --limit 6 run) hold every kind
    assert {t.kind for t in tasks[:6]} == {"arithmetic", "factual", "open"}
    arith = [t for t in tasks if t.kind == "arithmetic"]
    for t in arith:  # generated answers are right, and not given away by the question
        assert compare._eval_expr(t.expr) == int(t.answer)
        assert t.answer not in re.findall(r"\d+", t.question)
    assert [t.question for t in arith] == [d["question"] for d in compare.generate_arithmetic(len(arith))]


def test_load_tasks_refuses_bad_files(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"id": "a", "question": "q", "checker": "regex", "answer": "1"}\n')
    with pytest.raises(ValueError, match="checker='regex' is not valid"):
        load_tasks(bad)
    bad.write_text('{"id": "a", "question": "q", "checker": "number", "answer": "seven"}\n')
    with pytest.raises(ValueError, match="not a number"):
        load_tasks(bad)
    bad.write_text('{"id": "a", "question": "q"}\n{"id": "a", "question": "r"}\n')
    with pytest.raises(ValueError, match="duplicate task id"):
        load_tasks(bad)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        (Task("n", "q", "number", "28"), "He has 28 apples.", True),
        (Task("n", "q", "number", "28"), "9 + 20 - 1 = 28.0", True),
        (Task("n", "q", "number", "28"), "28? No wait, 27.", False),  # the last number counts
        (Task("n", "q", "number", "1234"), "It costs $1,234.", True),
        (Task("n", "q", "number", "28"), "I don't know.", False),
        (Task("n", "q", "number", "28"), "", False),
        (Task("c", "q", "contains", ["Paris"]), "The capital of France is Paris.", True),
        (Task("c", "q", "contains", ["Paris"]), "the capital is PARIS", True),
        (Task("c", "q", "contains", ["Paris"]), "Parisian food is good.", False),  # whole words only
        (Task("c", "q", "contains", ["Au"]), "Its symbol is Au.", True),
        (Task("c", "q", "contains", ["Au"]), "Gold is found in Australia.", False),
        (Task("c", "q", "contains", ["New York", "NYC"]), "It is  new\nyork city.", True),
        (Task("o", "q"), "Anything at all", None),
    ],
)
def test_check_answer(task, text, expected):
    assert check_answer(task, text) is expected


def _row(mode, steps, correct, **kw):
    base = {f: None for f in compare.SUMMARY_FIELDS}
    base.update(mode=mode, steps=steps, correct=correct, vote_correct=None, error=None)
    base.update(kw)
    return base


def test_summary_accuracy_and_table():
    rows = [
        _row("ar", None, True, total_ms=100.0, ttft_ms=10.0, answer_tokens=5),
        _row("ar", None, False, total_ms=300.0, ttft_ms=30.0, answer_tokens=7),
        _row("ar", None, None, total_ms=200.0, ttft_ms=20.0, answer_tokens=6),  # open task: not checked
        _row("diffusion", 8, True, vote_correct=True, nfe_plan=8, tse=0.5, local_arness=1.0, global_arness=0.5),
        _row("diffusion", 8, None, nfe_plan=6, tse=1.5, local_arness=0.0, global_arness=0.5),
        _row("diffusion", 8, None, error="RealizerError: boom"),
    ]
    s = {(x["mode"], x["steps"]): x for x in summarise(rows)}
    ar, d = s[("ar", None)], s[("diffusion", 8)]
    assert ar["accuracy"] == 0.5 and ar["checked"] == 2 and ar["runs"] == 3 and ar["errors"] == 0
    assert ar["total_ms"] == 200.0 and ar["answer_tokens"] == 6.0 and ar["tse"] is None
    assert d["accuracy"] == 1.0 and d["vote_accuracy"] == 1.0 and d["errors"] == 1
    assert d["nfe_plan"] == 7.0 and d["tse"] == 1.0 and d["local_arness"] == 0.5
    table = format_table(summarise(rows))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["mode", "steps", "acc"]
    ar_line = next(ln for ln in lines if ln.startswith("ar"))
    assert "50% (1/2)" in ar_line and "–" in ar_line  # AR has no steps / TSE
    assert "(1 err)" in table
    md = format_table(summarise(rows), markdown=True)
    assert md.startswith("| mode | steps |") and md.count("\n") == 3


def _ctx(planner, realizer):
    cfg = HybridConfig.load(
        **{
            "planner.gen_length": 16,
            "planner.answer_length": 16,
            "planner.steps": 16,
            "planner.block_length": 8,
            "realizer.max_tokens": 8,
            "score.clusterer": "exact",
            "revise.max_revisions": 1,
        }
    )
    # the CLI's sampler (threshold commits, as configured), over the tiny planner's model and tokenizer
    planner = Planner(planner.model, planner.tokenizer, runtime.sampler_config(cfg), name="tiny")
    return HybridContext(config=cfg, planner=planner, realizer=realizer)


@pytest.mark.slow
def test_sweep_writes_every_output(tiny_planner, smol_realizer, tmp_path):
    tasks = [t for t in load_tasks() if t.id in ("arith-01", "fact-capital-france", "open-tea")]
    ctx = _ctx(tiny_planner, smol_realizer)
    before = ctx.planner.sampler
    rows, states = asyncio.run(compare.sweep(ctx, tasks, steps_list=[4, 16], out_dir=tmp_path, progress=False))
    assert ctx.planner.sampler is before  # the sweep restores the planner's sampler
    assert len(rows) == 3 * (1 + 2 * 2) and not [r for r in rows if r["error"]]
    by = {(r["task"], r["mode"], r["steps"]): r for r in rows}
    for r in rows:
        task = next(t for t in tasks if t.id == r["task"])
        assert r["correct"] == check_answer(task, r["answer"])  # the recorded verdict is the checker's
        assert r["total_ms"] > 0 and r["ttft_ms"] > 0 and r["answer_tokens"] > 0
        if r["mode"] == "ar":
            assert r["steps"] is None and r["tse"] is None and r["local_arness"] is None and r["nfe_plan"] == 0
        else:
            assert r["tse"] is not None and 0 <= r["local_arness"] <= 1 and 0 <= r["global_arness"] <= 1
            assert r["nfe_plan"] >= 2  # two blocks, at least one pass each
    # the step budget is the dial: 4 steps over 2 blocks is 2 passes per block at most
    for t in tasks:
        for mode in ("hybrid", "diffusion"):
            r = by[(t.id, mode, 4)]
            assert r["steps_run"] <= 4 and r["gen_length"] == 16
            assert r["nfe_plan"] <= 4 * (1 + r["revisions"])
    assert by[("arith-01", "hybrid", 4)]["vote_correct"] is not None  # number tasks vote over numbers
    assert by[("open-tea", "hybrid", 4)]["vote_correct"] is None

    summary = summarise(rows)
    assert [(s["mode"], s["steps"]) for s in summary] == [
        ("hybrid", 4),
        ("hybrid", 16),
        ("diffusion", 4),
        ("diffusion", 16),
        ("ar", None),
    ]
    files = compare.write_outputs(tmp_path, rows, summary, {"command": "test"})
    with (tmp_path / "runs.csv").open() as f:
        header = next(csv.reader(f))
    for col in ("task", "mode", "steps", "correct", "nfe_plan", "plan_ms", "ttft_ms", "total_ms", "tok_s"):
        assert col in header
    for col in ("answer_tokens", "tse", "vote", "local_arness", "global_arness"):
        assert col in header
    with (tmp_path / "summary.csv").open() as f:
        assert next(csv.reader(f)) == compare.SUMMARY_FIELDS
    data = json.loads((tmp_path / "summary.json").read_text())
    assert len(data["runs"]) == len(rows) and len(data["summary"]) == 5
    assert "TTFT ms" in (tmp_path / "table.txt").read_text()
    for name in ("latency_vs_steps", "quality_vs_steps"):
        png = files[name].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # run states: one per run, with the trajectory the viewer replays
    saved = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(saved) == len(rows)
    st = json.loads((tmp_path / "runs" / "arith-01__diffusion__s16.json").read_text())
    assert st["first_trajectory"]["steps"] and st["task"]["id"] == "arith-01" and st["steps"] == 16
    pages = compare.write_first_viewers(tmp_path, tasks, states, ctx, 4)
    assert [p.name for p in pages] == ["viewer_arith-01_hybrid.html", "viewer_arith-01_diffusion.html"]
    page = pages[1].read_text()
    ar_answer = states["arith-01__ar.json"]["answer"]
    assert "viewer-data" in page and json.dumps(ar_answer)[1:12] in page.replace("\\u003c", "<")


def test_cli_ar_only_and_errors(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = compare.main(["--limit", "2", "--modes", "ar", "--max-tokens", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("mode") and "\nar" in printed
    data = json.loads((out / "summary.json").read_text())
    assert [r["mode"] for r in data["runs"]] == ["ar", "ar"] and data["settings"]["modes"] == ["ar"]
    assert (out / "runs" / "arith-01__ar.json").exists()
    with pytest.raises(SystemExit):
        compare.main(["--modes", "nope"])
    with pytest.raises(SystemExit):
        compare.main(["--steps", "8,x"])
    assert compare.main(["--limit", "0"]) == 2
    assert compare.main(["--tasks", str(tmp_path / "none.jsonl")]) == 2
    assert "task file not found" in capsys.readouterr().err


def test_check_steps_names_the_problem(tiny_planner):
    ctx = _ctx(tiny_planner, None)
    compare.check_steps(ctx, [2, 8, 16])
    with pytest.raises(ValueError, match="invalid --steps: 1 "):
        compare.check_steps(ctx, [1, 16])  # fewer steps than the 2 blocks
    ctx.config.planner.answer_length = 64  # diffusion mode: 8 blocks, steps scaled by 4
    compare.check_steps(ctx, [2], ["diffusion"])
    ctx.config.planner.commit = "static"  # steps % blocks == 0; the request's config, never the loaded planner
    with pytest.raises(ValueError, match="invalid --steps: 3 .*multiple of the number of blocks"):
        compare.check_steps(ctx, [3], ["diffusion"])
