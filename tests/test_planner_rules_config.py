"""Planner rules from every configuration surface: the CLI's flags and `--set` (parse level, and its one-line
errors), and the server's per-request `hybrid_planner` object, run for real as tests/test_server.py runs the app:
uvicorn on loopback, the real graph, the tiny random block-causal planner (diffusion mode only: no realizer)."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from hybrid.cli import build_parser, config_from_args, main
from hybrid.config import HybridConfig
from hybrid.runtime import sampler_config


# ============================================================================================ CLI
def _cfg(*argv: str, command: str = "run") -> HybridConfig:
    if command == "serve":
        from hybrid.server import build_parser as serve_parser

        return config_from_args(serve_parser().parse_args(list(argv)))
    return config_from_args(build_parser().parse_args(["run", "q", *argv]))


@pytest.mark.parametrize("command", ["run", "serve"])
def test_rule_flags(command):
    cfg = _cfg(
        "--commit", "factor", "--confidence", "margin", "--factor", "2.5", "--boost", "credit",
        "--blocks", "adaptive", "--eos-early-stop", "any", "--cache", "dual", "--remask", "low_confidence",
        "--planner-temperature", "0.3", command=command,
    )  # fmt: skip
    s = sampler_config(cfg)
    assert (s.commit, s.confidence, s.factor, s.boost, s.blocks) == ("factor", "margin", 2.5, "credit", "adaptive")
    assert (s.eos_early_stop, s.cache, s.remask, s.temperature) == ("any", "dual", "low_confidence", 0.3)
    assert _cfg("--strategy", "threshold", command=command).planner.commit == "threshold"  # the old spelling


def test_set_reaches_any_field_with_json_values():
    cfg = _cfg(
        "--set", "planner.credit_alpha=0.5",
        "--set", "planner.boost=credit",  # not JSON: a string
        "--set", "planner.delimiter_ids=[13, 198]",
        "--set", "planner.seed=null",  # JSON null: None (a flag left out is not the same as null)
        "--set", "planner.confidence=entropy", "--set", "planner.threshold=2",  # nats
        "--set", "score.alpha=3", "--set", "realizer.stop_loops=false", "--set", "mode=diffusion",
        "--set", "planner.steps=32", "--steps", "16",  # --set wins over a flag
    )  # fmt: skip
    p = cfg.planner
    assert (p.credit_alpha, p.boost, p.delimiter_ids, p.seed) == (0.5, "credit", (13, 198), None)
    assert (p.confidence, p.threshold, p.steps) == ("entropy", 2.0, 32)
    assert (cfg.score.alpha, cfg.realizer.stop_loops, cfg.mode) == (3.0, False, "diffusion")
    s = sampler_config(cfg, "diffusion")
    assert (s.credit_alpha, s.delimiter_ids, s.seed, s.threshold) == (0.5, (13, 198), None, 2.0)


def _error(capsys, *argv: str) -> str:
    assert main(["run", "hi", *argv]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hybrid: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["--set", "planner.threshold=2"],
            "invalid configuration: planner.threshold must be a probability in (0, 1] for confidence='max_prob', "
            "got 2.0",
        ),
        (
            ["--boost", "turbo"],
            "invalid configuration: planner.boost='turbo' is not valid; choose one of: none, credit",
        ),
        (["--set", "planner.nonsense=1"], "invalid configuration: planner.nonsense: unknown setting"),
        (["--set", "planner.factor"], "--set expects KEY=VALUE"),
        (["--commit", "factor", "--confidence", "entropy"], "planner.commit='factor' reads confidences"),
    ],
)
def test_bad_values_are_one_line_errors(capsys, argv, line):
    assert line in _error(capsys, *argv)


def test_flag_and_file_give_the_same_error(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("planner:\n  blocks: adaptive\n  commit: static\n")
    from_file = _error(capsys, "--config", str(f))
    assert from_file == _error(capsys, "--blocks", "adaptive", "--commit", "static")
    assert "planner.blocks='adaptive' needs a dynamic commit rule" in from_file


# ============================================================================================ server
@pytest.fixture(scope="module")
def served_diffusion(tiny_planner):
    from test_server import KEY, ThreadServer, make_ctx

    from hybrid.server import BatchingPlanner, create_app
    from planners.planner import Planner

    class Recording(BatchingPlanner):
        def _submit(self, job):
            self.seen.append(job.config)
            return super()._submit(job)

    planner = Planner(
        tiny_planner.model, tiny_planner.tokenizer, dataclasses.replace(tiny_planner.sampler, cache="prefix")
    )
    batcher = Recording(planner, max_batch=8, window_s=1.0)  # wide: concurrent equal requests do share a batch
    batcher.seen = []
    over = {"mode": "diffusion", "planner.answer_length": 16, "planner.commit": "static", "revise.max_revisions": 0}
    ctx = make_ctx(batcher, None, **over)
    app = create_app(ctx, api_key=KEY)
    try:
        with ThreadServer(app) as srv:
            yield srv, batcher, ctx.config, planner
    finally:
        batcher.close()


def _post(srv, **extra):
    from test_server import HEADERS, body

    return httpx.post(f"{srv.url}/v1/chat/completions", json=body(**extra), headers=HEADERS, timeout=120)


def test_request_planner_settings_reach_the_planner(served_diffusion):
    from test_server import QUESTION

    from hybrid import prompts

    srv, batcher, cfg, planner = served_diffusion
    settings = {"commit": "factor", "factor": 2.0}
    r = _post(srv, hybrid_mode="diffusion", hybrid_planner=settings)
    assert r.status_code == 200, r.text
    want = dataclasses.replace(sampler_config(cfg, "diffusion"), commit="factor", factor=2.0)
    assert batcher.seen[-1] == want and want.commit == "factor" and want.factor == 2.0
    # the answer and its cost are those of the same plan drafted directly with these settings
    solo = planner.plan(prompts.answer_messages(QUESTION), config=want)
    d = r.json()
    assert d["choices"][0]["message"]["content"] == solo.text
    assert d["hybrid"]["timings"]["nfe"] == solo.stats["nfe"]
    # without the object: the server's own settings
    r = _post(srv, hybrid_mode="diffusion")
    assert r.status_code == 200 and batcher.seen[-1] == sampler_config(cfg, "diffusion")
    static = planner.plan(prompts.answer_messages(QUESTION), config=sampler_config(cfg, "diffusion"))
    assert r.json()["hybrid"]["timings"]["nfe"] == static.stats["nfe"]
    assert solo.stats["nfe"] < static.stats["nfe"]  # the factor rule committed more than one token in some step


def test_different_settings_are_not_batched_together(served_diffusion):
    from test_server import HEADERS, body

    srv, batcher, _, _ = served_diffusion

    def batches(settings_pair) -> tuple[int, int]:
        before = srv.metrics()

        async def go():
            async with httpx.AsyncClient(timeout=120) as client:
                url = f"{srv.url}/v1/chat/completions"
                posts = [client.post(url, json=body(hybrid_planner=s), headers=HEADERS) for s in settings_pair]
                return await asyncio.gather(*posts)

        assert all(r.status_code == 200 for r in asyncio.run(go()))
        after = srv.metrics()
        return after["plan_batches"] - before["plan_batches"], after["plan_rows"] - before["plan_rows"]

    assert batches([{"commit": "factor", "factor": 2.0}, {"commit": "factor", "factor": 3.0}]) == (2, 2)
    assert batches([{"commit": "factor", "factor": 2.0}, {"commit": "factor", "factor": 2.0}]) == (1, 2)


@pytest.mark.parametrize(
    "settings, param, needle",
    [
        ({"model": "/elsewhere"}, "hybrid_planner.model", "cannot be set per request"),
        ({"engine": "torch"}, "hybrid_planner.engine", "fixed when the server loads the planner"),
        ({"turbo": True}, "hybrid_planner.turbo", "allowed keys: gen_length, answer_length, steps"),
        ({"threshold": 2.0}, "hybrid_planner.threshold", "hybrid_planner.threshold must be a probability in (0, 1]"),
        ({"boost": "more"}, "hybrid_planner.boost", "choose one of: none, credit"),
        ({"factor": "big"}, "hybrid_planner.factor", "valid number"),
        ({"block_length": 16}, "hybrid_planner.block_length", "trained on blocks of 8"),
        ({"answer_length": 2048}, "messages", "the planner's context leaves room for 0"),
        ("factor", "hybrid_planner", "valid dictionary"),
    ],
)
def test_bad_planner_settings_are_400s(served_diffusion, settings, param, needle):
    srv = served_diffusion[0]
    r = _post(srv, hybrid_mode="diffusion", hybrid_planner=settings)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert srv.healthy()
