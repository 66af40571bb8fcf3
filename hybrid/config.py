"""One validated configuration for the whole product: file, environment, CLI flags.

Precedence (lowest to highest): defaults < YAML/JSON config file < environment (`HYBRID_*`, nested
with `__`, e.g. `HYBRID_PLANNER__STEPS=32`) < explicit overrides (CLI flags, server fields).
Validated once, at the boundary; errors name the field and the allowed values. This module loads
no model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Mode = Literal["hybrid", "diffusion", "ar"]
MODES: tuple[str, ...] = ("hybrid", "diffusion", "ar")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _check_name(field: str, value: str, valid: tuple[str, ...] | list[str]) -> str:
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; choose one of: {', '.join(valid)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PlannerSettings(_Section):
    model: str | None = Field(
        None, description="planner weights: a LLaDA / Dream / Llama checkpoint directory or .gguf; None = embedded"
    )
    adapter: str | None = Field(None, description="adapter .safetensors for an AR checkpoint; None = shipped default")
    mask_token_id: int | None = Field(None, description="mask id for AR checkpoints without one in config.json")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: Literal["auto", "torch", "llama_cpp"] = Field(
        "auto",
        description="what runs the planner's forward passes: torch, or llama.cpp on a GGUF export (block-causal "
        "Llama-family planners on the CPU); auto = the fastest that meets the quality gates (benchmarks/README.md, "
        "'Plan vs realizer')",
    )
    engine_weights: Literal["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"] | None = Field(
        None, description="engine llama_cpp: GGUF weight type of the export; None = the measured default"
    )
    gen_length: int = Field(48, ge=1, le=4096)
    answer_length: int = Field(96, ge=1, le=4096, description="generation length in diffusion mode (the answer)")
    steps: int = Field(48, ge=1, le=4096)
    block_length: int = Field(8, ge=1, le=4096)
    commit: str = Field(
        "learned", description="commit rule; learned = the shipped Learn2PD-style policy (benchmarks/README.md)"
    )
    confidence: str = "max_prob"
    threshold: float = Field(
        0.95, gt=0.0, le=1.0, description="threshold commits: confidence tau; learned commits: P(final) cut-off"
    )
    commit_policy: str | None = Field(
        None, description="commit=learned: policy weights (.safetensors); None = the shipped planners/weights one"
    )
    temperature: float = Field(0.0, ge=0.0)
    cfg_scale: float = Field(0.0, ge=0.0)
    cache: str = "prefix"
    seed: int | None = 0

    @field_validator("commit")
    @classmethod
    def _commit(cls, v: str) -> str:
        from planners.strategies import COMMITS

        return _check_name("planner.commit", v, sorted(COMMITS))

    @field_validator("commit_policy")
    @classmethod
    def _commit_policy(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"planner.commit_policy={v!r}: no such file (a .safetensors commit policy)")
        return None if v is None else str(Path(v).expanduser())

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, v: str) -> str:
        from planners.strategies import CONFIDENCES

        return _check_name("planner.confidence", v, sorted(CONFIDENCES))

    @field_validator("cache")
    @classmethod
    def _cache(cls, v: str) -> str:
        return _check_name("planner.cache", v, ("none", "prefix", "dual"))

    @model_validator(mode="after")
    def _blocks(self) -> PlannerSettings:
        if self.block_length > self.gen_length:
            raise ValueError(
                f"planner.block_length ({self.block_length}) exceeds planner.gen_length ({self.gen_length})"
            )
        for name in ("gen_length", "answer_length"):
            if getattr(self, name) % self.block_length:
                raise ValueError(
                    f"planner.{name} ({getattr(self, name)}) must be a multiple of planner.block_length "
                    f"({self.block_length})"
                )
        return self


class ScoreSettings(_Section):
    skip_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    weighting: Literal["exp", "linear", "uniform"] = "exp"
    alpha: float = Field(5.0, ge=0.0)
    extractor: str = "full_text"
    clusterer: str = "embedding"
    similarity: float = Field(0.85, gt=0.0, le=1.0, description="cosine threshold of the embedding clusterer")
    signal: str = Field(
        "low_confidence",
        description="the score a plan is accepted on (score['value'], higher = less trustworthy); measured in "
        "benchmarks/README.md, 'TSE as a signal'",
    )
    threshold: float = Field(
        0.2647,
        ge=0.0,
        description="accept a plan whose score['value'] is at or below this (calibrated on the factual task set: "
        "benchmarks/README.md, 'TSE as a signal')",
    )
    tse_threshold: float | None = Field(
        None, ge=0.0, description="deprecated alias of score.threshold (kept for old configs and flags)"
    )
    min_words: int = Field(2, ge=0, description="a plan with fewer words is degenerate (near-empty)")
    reject_degenerate: bool = Field(True, description="repetition loops and near-empty plans are never accepted")

    @property
    def accept_at(self) -> float:
        """The acceptance threshold in force (tse_threshold, if set, wins: it is the older spelling)."""
        return self.threshold if self.tse_threshold is None else self.tse_threshold

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        from planners.tse import SIGNALS

        return _check_name("score.signal", v, sorted(SIGNALS))

    @field_validator("extractor")
    @classmethod
    def _extractor(cls, v: str) -> str:
        from planners.tse import EXTRACTORS

        return _check_name("score.extractor", v, sorted(EXTRACTORS))

    @field_validator("clusterer")
    @classmethod
    def _clusterer(cls, v: str) -> str:
        from planners.tse import CLUSTERERS

        return _check_name("score.clusterer", v, sorted(CLUSTERERS))


class ReviseSettings(_Section):
    max_revisions: int = Field(
        0, ge=0, le=16, description="revise budget; 0 by default: revising did not raise accuracy (benchmarks/README)"
    )
    fraction: float = Field(0.25, gt=0.0, le=1.0, description="share of the plan span remasked per revision")
    rule: Literal["latest", "low_confidence", "mixed"] = "latest"
    mode: Literal["remask", "resample"] = "remask"
    temperature: float = Field(
        0.0, ge=0.0, description="sampling temperature of remask redraws (each attempt has its own seed)"
    )


class RealizerSettings(_Section):
    kind: Literal["embedded", "openai"] = "embedded"
    backend: Literal["llama_cpp", "transformers"] = "llama_cpp"
    extra_bufts: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama.cpp's CPU extra buffer types (AMX / weight repacking): auto = probe once per machine "
        "in a child process (realizers/llamacpp.py); the environment variable HYBRID_LLAMA_EXTRA_BUFTS also forces it",
    )
    max_seqs: int = Field(
        32, ge=1, le=256, description="embedded llama.cpp: requests decoded together (KV cache: max_seqs x 2048 cells)"
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="served model name (openai) or a local model path (embedded)")
    api_key: str = "EMPTY"
    timeout_s: float = Field(60.0, gt=0.0)
    connect_timeout_s: float = Field(5.0, gt=0.0)
    max_retries: int = Field(1, ge=0, le=10)
    max_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(
        1.1,
        ge=1.0,
        le=2.0,
        description="penalise recently generated tokens (llama.cpp / vLLM repetition penalty); 1.0 = off. 1.1 cut "
        "answers that run to max_tokens from 54% to 38% at equal accuracy (benchmarks/README.md, 'Answers that end')",
    )
    stop_loops: bool = Field(
        True, description="embedded realizers: end a stream that repeats itself back to back (realizers/loops.py)"
    )

    @model_validator(mode="after")
    def _url(self) -> RealizerSettings:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("realizer.base_url is required when realizer.kind is 'openai'")
        return self


class HybridConfig(BaseSettings):
    """Everything a run needs to know (see module docstring for precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="HYBRID_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    mode: Mode = "hybrid"
    max_question_chars: int = Field(8000, ge=1)
    planner: PlannerSettings = PlannerSettings()
    score: ScoreSettings = ScoreSettings()
    revise: ReviseSettings = ReviseSettings()
    realizer: RealizerSettings = RealizerSettings()
    checkpoint_db: str | None = Field(None, description="SQLite file for conversation state (keyed by thread id)")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)  # init (overrides) beats env; file values are merged into init

    @classmethod
    def load(cls, file: str | os.PathLike | None = None, **overrides: Any) -> HybridConfig:
        """Build from an optional YAML/JSON file, the environment and overrides (dotted keys allowed:
        `{"planner.steps": 32}`). Raises ConfigError with one readable line per problem."""
        data: dict[str, Any] = {}
        if file is not None:
            data = _read_file(Path(file))
        env_data = _env_layer()
        merged = _deep_merge(_deep_merge(data, env_data), _undot(overrides))
        try:
            return cls(**merged)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None


def _env_layer() -> dict[str, Any]:
    # Read HYBRID_* ourselves so file < env < overrides holds for nested keys too.
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if (
            not key.startswith("HYBRID_")
            or key in ("HYBRID_CACHE_DIR", "HYBRID_KERNELS", "HYBRID_API_KEY", "HYBRID_LLAMA_EXTRA_BUFTS")  # not fields
            or key.startswith(("HYBRID_VLLM", "HYBRID_REQUIRE", "HYBRID_TEST"))
        ):
            continue
        path = key[len("HYBRID_") :].lower().split("__")
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _undot(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            msg = f"got {err.get('input')!r}; allowed: {expected}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{loc}: {msg}")
    return "invalid configuration: " + "; ".join(lines)
