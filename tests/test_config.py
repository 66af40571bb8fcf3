"""Configuration: one validated model; file < env < overrides; errors name the field and allowed values."""

from __future__ import annotations

import json

import pytest

from hybrid.config import ConfigError, HybridConfig


def test_defaults_are_valid():
    c = HybridConfig.load()
    assert c.mode == "hybrid"
    assert c.planner.gen_length % c.planner.block_length == 0


def test_precedence_file_env_overrides(tmp_path, monkeypatch):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"mode": "ar", "planner": {"steps": 20, "gen_length": 32}}))
    assert HybridConfig.load(f).planner.steps == 20
    monkeypatch.setenv("HYBRID_PLANNER__STEPS", "24")
    c = HybridConfig.load(f)
    assert c.planner.steps == 24 and c.mode == "ar" and c.planner.gen_length == 32
    assert HybridConfig.load(f, **{"planner.steps": 30}).planner.steps == 30


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: diffusion\nrevise:\n  max_revisions: 1\n")
    c = HybridConfig.load(f)
    assert c.mode == "diffusion" and c.revise.max_revisions == 1


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"mode": "turbo"}, "mode: got 'turbo'; allowed: 'hybrid', 'diffusion' or 'ar'"),
        ({"planner.commit": "magic"}, "planner.commit='magic' is not valid; choose one of:"),
        ({"planner.cache": "huge"}, "planner.cache='huge' is not valid; choose one of: none, prefix, dual"),
        ({"planner.gen_length": 50, "planner.block_length": 8}, "must be a multiple of planner.block_length"),
        ({"planner.steps": 0}, "planner.steps"),
        ({"realizer.kind": "openai"}, "realizer.base_url is required"),
        ({"score.clusterer": "kmeans"}, "score.clusterer='kmeans' is not valid"),
        ({"planner.nonsense": 1}, "planner.nonsense: unknown setting"),
    ],
)
def test_errors_name_field_and_allowed_values(override, needle):
    with pytest.raises(ConfigError) as e:
        HybridConfig.load(**override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        HybridConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        HybridConfig.load(bad)


# ============================================================================================ planner rules
# A non-default valid value for every SamplerConfig field the product exposes (all but record_trajectory). A new
# SamplerConfig field fails `test_every_sampler_field_is_settable` until it is plumbed and given a value here.
def _planner_values() -> dict:
    from planners.commit_policy import DEFAULT_COMMIT_POLICY

    return {
        "gen_length": 64,
        "steps": 32,
        "block_length": 16,
        "temperature": 0.5,
        "cfg_scale": 1.5,
        "confidence": "margin",
        "position_calibration": 0.25,
        "commit": "factor",
        "schedule": "dream",
        "schedule_eps": 0.01,
        "threshold": 0.8,
        "eb_gamma": 0.2,
        "factor": 2.0,
        "commit_policy": str(DEFAULT_COMMIT_POLICY),
        "boost": "credit",
        "credit_alpha": 0.5,
        "credit_gamma": 0.3,
        "credit_decay": 0.6,
        "blocks": "adaptive",
        "delimiter_threshold": 0.4,
        "adaptive_window": 12,
        "delimiter_ids": (13, 198),
        "remask": "low_confidence",
        "remask_threshold": 0.2,
        "remask_fraction": 0.25,
        "eos_early_stop": "any",
        "cache": "dual",
        "precision": "float64",
        "seed": 7,
    }


def _env_text(v) -> str:
    return ",".join(str(i) for i in v) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("source", ["overrides", "environment"])
def test_every_sampler_field_is_settable(source, monkeypatch):
    """Walk SamplerConfig's fields: each (but record_trajectory, always on) set through the config arrives in the
    SamplerConfig a request plans with (hybrid.runtime.sampler_config), one field at a time."""
    import dataclasses

    from hybrid.runtime import sampler_config
    from planners.sampler import SamplerConfig

    values, default = _planner_values(), SamplerConfig()
    names = [f.name for f in dataclasses.fields(SamplerConfig) if f.name != "record_trajectory"]
    missing = [n for n in names if n not in values]
    assert not missing, f"new SamplerConfig fields: plumb them through PlannerSettings and add a value here: {missing}"
    base = HybridConfig.load().planner
    for name in names:
        v = values[name]
        assert v != getattr(default, name) and v != getattr(base, name), name  # a change the test can see
        if source == "overrides":
            cfg = HybridConfig.load(**{f"planner.{name}": v})
        else:
            with monkeypatch.context() as m:
                m.setenv(f"HYBRID_PLANNER__{name.upper()}", _env_text(v))
                cfg = HybridConfig.load()
        assert getattr(sampler_config(cfg), name) == v, name
    assert sampler_config(HybridConfig.load()).record_trajectory  # the score reads the trajectory


def test_all_new_rules_together_from_a_yaml_file(tmp_path):
    from hybrid.runtime import sampler_config

    f = tmp_path / "c.yaml"
    f.write_text(
        "planner:\n"
        "  commit: factor\n  factor: 2.5\n  confidence: margin\n"
        "  boost: credit\n  credit_alpha: 0.5\n  credit_decay: 0.9\n"
        "  blocks: adaptive\n  delimiter_threshold: 0.5\n  adaptive_window: 16\n  delimiter_ids: [13, 198]\n"
        "  eos_early_stop: any\n  remask: low_confidence\n  precision: float64\n  schedule: dream\n"
    )
    s = sampler_config(HybridConfig.load(f))
    assert (s.commit, s.factor, s.confidence) == ("factor", 2.5, "margin")
    assert (s.boost, s.credit_alpha, s.credit_decay) == ("credit", 0.5, 0.9)
    assert (s.blocks, s.delimiter_threshold, s.adaptive_window, s.delimiter_ids) == ("adaptive", 0.5, 16, (13, 198))
    assert (s.eos_early_stop, s.remask, s.precision, s.schedule) == ("any", "low_confidence", "float64", "dream")
    # the product defaults stay
    assert (s.cache, s.gen_length, s.steps, s.block_length, s.seed) == ("prefix", 48, 48, 8, 0)
    d = sampler_config(HybridConfig.load(f), "diffusion")  # diffusion mode: same rules, the answer's length
    assert (d.commit, d.blocks, d.gen_length, d.steps) == ("factor", "adaptive", 96, 96)


@pytest.mark.parametrize(
    "text, want",
    [
        ("[13, 198]", (13, 198)),
        ("13,198", (13, 198)),
        (" 13 , 198 ", (13, 198)),
        ("7", (7,)),
        ("none", None),
        ("", None),
    ],
)
def test_env_delimiter_ids(monkeypatch, text, want):
    monkeypatch.setenv("HYBRID_PLANNER__DELIMITER_IDS", text)
    assert HybridConfig.load().planner.delimiter_ids == want


@pytest.mark.parametrize("text, want", [("12", 12), ("none", None), ("None", None), ("", None), ("null", None)])
def test_env_adaptive_window(monkeypatch, text, want):
    monkeypatch.setenv("HYBRID_PLANNER__ADAPTIVE_WINDOW", text)
    assert HybridConfig.load().planner.adaptive_window == want


def test_env_new_rules(monkeypatch):
    monkeypatch.setenv("HYBRID_PLANNER__COMMIT", "factor")
    monkeypatch.setenv("HYBRID_PLANNER__FACTOR", "2")
    monkeypatch.setenv("HYBRID_PLANNER__BOOST", "credit")
    p = HybridConfig.load().planner
    assert (p.commit, p.factor, p.boost) == ("factor", 2.0, "credit")
    monkeypatch.setenv("HYBRID_PLANNER__DELIMITER_IDS", "13,x")
    with pytest.raises(ConfigError, match=r"planner\.delimiter_ids='13,x' is not a list of token ids"):
        HybridConfig.load()


def test_threshold_is_validated_per_confidence():
    """Entropy thresholds are nats (any finite number >= 0); the other confidences' are probabilities in (0, 1]."""
    from hybrid.runtime import sampler_config

    cfg = HybridConfig.load(**{"planner.confidence": "entropy", "planner.threshold": 2.0})
    assert sampler_config(cfg).threshold == 2.0
    for confidence in ("max_prob", "margin"):
        with pytest.raises(ConfigError) as e:
            HybridConfig.load(**{"planner.confidence": confidence, "planner.threshold": 2.0})
        msg = str(e.value)
        assert msg.startswith("invalid configuration: planner.threshold must be a probability in (0, 1]"), msg
        assert f"confidence={confidence!r}" in msg and "got 2.0" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"planner\.threshold must be a finite number of nats >= 0"):
        HybridConfig.load(**{"planner.confidence": "entropy", "planner.threshold": -1.0})
    cfg = HybridConfig.load(**{"planner.confidence": "entropy", "planner.threshold": 2.0})
    with pytest.raises(ValueError, match=r"planner\.threshold must be a probability"):  # assignment validates too
        cfg.planner.confidence = "max_prob"


@pytest.mark.parametrize(
    "field, registry",
    [
        ("commit", "COMMITS"),
        ("confidence", "CONFIDENCES"),
        ("boost", "BOOSTS"),
        ("blocks", "BLOCK_RULES"),
        ("remask", "REMASKS"),
        ("schedule", "SCHEDULES"),
        ("cache", "CACHES"),
        ("precision", "PRECISIONS"),
        ("eos_early_stop", "EARLY_STOPS"),
    ],
)
def test_rule_names_list_the_registry(field, registry):
    import planners.strategies as strategies

    with pytest.raises(ConfigError) as e:
        HybridConfig.load(**{f"planner.{field}": "nope"})
    allowed = ", ".join(getattr(strategies, registry))
    assert str(e.value) == f"invalid configuration: planner.{field}='nope' is not valid; choose one of: {allowed}"


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"planner.commit": "factor", "planner.confidence": "entropy"}, "planner.commit='factor' reads confidences"),
        ({"planner.blocks": "adaptive", "planner.commit": "static"}, "planner.blocks='adaptive' needs a dynamic"),
        ({"planner.factor": 0}, "planner.factor must be a finite number > 0, got 0"),
        ({"planner.credit_decay": 1.5}, "planner.credit_decay must be in [0, 1], got 1.5"),
        ({"planner.temperature": -1}, "planner.temperature must be a finite number >= 0"),
        ({"planner.adaptive_window": 0}, "planner.adaptive_window must be a positive integer or None"),
        ({"planner.delimiter_ids": [13, -1]}, "planner.delimiter_ids must be token ids (integers >= 0)"),
        ({"planner.commit": "static", "planner.steps": 20}, "planner.steps=20 must be a multiple of the number"),
        ({"planner.factor": "big"}, "planner.factor: Input should be a valid number"),
    ],
)
def test_sampler_errors_name_the_planner_field(override, needle):
    with pytest.raises(ConfigError) as e:
        HybridConfig.load(**override)
    assert needle in str(e.value) and "\n" not in str(e.value)
