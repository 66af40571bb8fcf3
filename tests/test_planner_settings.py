"""Planner settings per request (one SamplerConfig from HybridConfig, nothing mutates a loaded planner), the same
redraw through `Planner` and the server's batching path, and a mistyped adapter path as an error."""

from __future__ import annotations

import dataclasses

import pytest

from hybrid.config import HybridConfig
from hybrid.runtime import sampler_config


def test_one_sampler_config_per_mode_from_the_config():
    cfg = HybridConfig.load(**{"planner.gen_length": 16, "planner.answer_length": 32, "planner.steps": 16})
    h, d = sampler_config(cfg, "hybrid"), sampler_config(cfg, "diffusion")
    assert (h.gen_length, h.steps) == (16, 16) and (d.gen_length, d.steps) == (32, 32)
    assert h.record_trajectory and h.seed == cfg.planner.seed and h.commit == cfg.planner.commit


def test_same_redraw_through_planner_and_batching_path(tiny_planner):
    from planners.batching import BatchingPlanner

    cfg = dataclasses.replace(tiny_planner.sampler, gen_length=16, steps=16, seed=3)
    before = dataclasses.replace(tiny_planner.sampler)
    first = tiny_planner.plan("Name three colours.", config=cfg)
    positions = [2, 3, 9, 10]
    solo = tiny_planner.redraw(first, positions, config=cfg)
    batcher = BatchingPlanner(tiny_planner, max_batch=4, window_s=0.0)
    try:
        batched = batcher.redraw(first, positions, config=cfg)
        # a span shorter than the config's gen_length: both paths derive the same settings (redraw_config)
        short = dataclasses.replace(first, span=first.span[:8], tokens=first.tokens[:8])
        solo_short = tiny_planner.redraw(short, [1, 2], config=cfg)
        batched_short = batcher.redraw(short, [1, 2], config=cfg)
    finally:
        batcher.close()
    assert batched.span == solo.span and batched.text == solo.text
    assert [s.x0_hat for s in batched.trajectory.steps] == [s.x0_hat for s in solo.trajectory.steps]
    assert batched.stats["nfe"] == solo.stats["nfe"]
    assert batched_short.span == solo_short.span and batched_short.stats["nfe"] == solo_short.stats["nfe"]
    assert all(a == b for i, (a, b) in enumerate(zip(first.span, solo.span, strict=True)) if i not in positions)
    assert tiny_planner.sampler == before  # nothing mutated the loaded planner


def test_compare_sweep_leaves_the_planner_alone(tiny_planner, smol_realizer):
    import asyncio

    from hybrid.compare import Task, sweep
    from hybrid.state import HybridContext

    before = tiny_planner.sampler
    small = {"planner.gen_length": 16, "planner.answer_length": 16, "planner.steps": 16, "realizer.max_tokens": 4}
    cfg = HybridConfig.load(**small, **{"score.clusterer": "exact", "revise.max_revisions": 0})
    ctx = HybridContext(config=cfg, planner=tiny_planner, realizer=smol_realizer)
    rows, states = asyncio.run(
        sweep(ctx, [Task("t", "Name a colour.")], modes=["diffusion"], steps_list=[8, 16], progress=False)
    )
    assert tiny_planner.sampler is before
    # the step sweep reached the planner through the request's config, not by mutating it
    assert [r["steps_run"] <= s for r, s in zip(rows, [8, 16], strict=True)] == [True, True]
    assert {s["plan_stats"]["gen_length"] for s in states.values()} == {16}


def test_mistyped_adapter_path_is_an_error_naming_it(tmp_path):
    from planners.planner import Planner

    missing = tmp_path / "typo" / "adaptr.safetensors"
    with pytest.raises(FileNotFoundError, match="adaptr.safetensors"):
        Planner.load(None, adapter=missing)


def test_mistyped_adapter_path_fails_setup_with_the_path(tmp_path):
    from hybrid.runtime import SetupError, build_planner

    cfg = HybridConfig.load(**{"planner.adapter": str(tmp_path / "nope.safetensors")})
    with pytest.raises(SetupError, match="nope.safetensors"):
        build_planner(cfg)


@pytest.mark.slow
def test_untrained_planner_only_when_asked():
    from planners.planner import Planner

    p = Planner.load(None, adapter="none")
    assert "untrained" in p.name
    assert "untrained" not in Planner.load(None).name


def test_blocks4_adapter_plans_through_the_product_settings():
    """The optional blocks-of-4 adapter (planners/weights/): its settings load it and it plans in blocks of 4; with
    the default block length the setup error says what to set."""
    from pathlib import Path

    from hybrid.runtime import SetupError, build_planner, sampler_config

    path = Path(__file__).resolve().parents[1] / "planners" / "weights" / "smollm2-planner-blocks4.safetensors"
    over = {"planner.adapter": str(path), "planner.engine": "torch", "planner.gen_length": 16, "planner.steps": 16}
    with pytest.raises(SetupError, match="set planner.block_length=4"):
        build_planner(HybridConfig.load(**over))
    cfg = HybridConfig.load(**over, **{"planner.block_length": 4, "planner.threshold": 0.85})
    planner = build_planner(cfg)
    assert planner.model.config.block_size == 4
    r = planner.plan("How do I make a cup of tea?", config=sampler_config(cfg))
    assert len(r.span) == 16 and r.text.strip()
    assert {s.block for s in r.trajectory.steps} == {0, 1, 2, 3}  # four blocks of 4
