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
