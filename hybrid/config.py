"""One validated configuration for the whole product: file, environment, CLI flags.

Precedence (lowest to highest): defaults < YAML/JSON config file < environment (`HYBRID_*`, nested
with `__`, e.g. `HYBRID_PLANNER__STEPS=32`) < explicit overrides (CLI flags, server fields).
Validated once, at the boundary; errors name the field and the allowed values. This module loads
no model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
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


# Planner settings fixed when the planner is loaded; every other PlannerSettings field is a sampling setting (one
# `planners.sampler.SamplerConfig` field each, settable per request: the server's `hybrid_planner` object).
PLANNER_LOAD_FIELDS: tuple[str, ...] = (
    "model",
    "adapter",
    "mask_token_id",
    "device",
    "dtype",
    "engine",
    "engine_weights",
    "threads",
)
# PlannerSettings fields checked by name against the sampler's strategy registries (`planners.strategies`)
_PLANNER_NAMES: dict[str, str] = {
    "commit": "COMMITS",
    "confidence": "CONFIDENCES",
    "schedule": "SCHEDULES",
    "boost": "BOOSTS",
    "blocks": "BLOCK_RULES",
    "remask": "REMASKS",
    "eos_early_stop": "EARLY_STOPS",
    "cache": "CACHES",
    "precision": "PRECISIONS",
}
_NONE_WORDS = ("", "none", "null")


def _planner_names(field: str) -> tuple[str, ...]:
    """The names the sampler accepts for a PlannerSettings field, in the registry's order."""
    import planners.strategies as strategies

    return tuple(getattr(strategies, _PLANNER_NAMES[field]))


def _token_ids(text: str) -> tuple[int, ...] | Any:
    """A string from the environment or a flag as token ids: a JSON list "[13, 198]" or "13,198"."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    else:
        try:
            return tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            pass
    raise ValueError(
        f'planner.delimiter_ids={text!r} is not a list of token ids: write a JSON list "[13, 198]" or "13,198"'
    )


class PlannerSettings(_Section):
    """The planner: what is loaded (PLANNER_LOAD_FIELDS) and how it samples (one field per field of
    `planners.sampler.SamplerConfig`, which validates them: the model validator builds it). Not settable:
    SamplerConfig.record_trajectory — the product always records the trajectory (the plan's score reads it)."""

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
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="engine llama_cpp: CPU threads; None = every core for `hybrid run` (nothing else runs while it "
        "plans), half of them for `hybrid serve` and the Python API (a realizer may decode at the same time)",
    )
    gen_length: int = Field(48, ge=1, le=4096, description="plan tokens (hybrid mode's generation length)")
    answer_length: int = Field(96, ge=1, le=4096, description="generation length in diffusion mode (the answer)")
    steps: int = Field(
        48, ge=1, le=4096, description="denoising step budget (a cap for dynamic commits); diffusion mode scales it"
    )
    block_length: int = Field(
        8,
        ge=1,
        le=4096,
        description="semi-autoregressive block length; a block-causal planner needs its training block size",
    )
    temperature: float = Field(0.0, description="Gumbel-max sampling temperature of the plan's tokens; 0 = greedy")
    cfg_scale: float = Field(0.0, description="classifier-free guidance weight (2 forward passes per step); 0 = off")
    confidence: str = Field(
        "max_prob",
        description="what the commit rule ranks by: max_prob (p of the token), margin (p1 - p2), entropy (token "
        "entropy in nats: lower = surer), random",
    )
    position_calibration: float = Field(
        0.0, description="score = confidence - strength * offset / block (cf. PC-Sampler); > 0 favours the left; 0 off"
    )
    commit: str = Field(
        "learned",
        description="commit rule: static | threshold | factor (Fast-dLLM) | dilated | entropy_bounded | learned (the "
        "shipped Learn2PD-style policy, benchmarks/README.md)",
    )
    schedule: str = Field("llada", description="tokens per step of counted commits (static, dilated): llada | dream")
    schedule_eps: float = Field(1e-3, description="schedule=dream: the final timestep, in (0, 1)")
    threshold: float = Field(
        0.95,
        description="commit=threshold: tau in the confidence's units (a probability in (0, 1]; nats for "
        "confidence=entropy); commit=learned: the P(final) cut-off",
    )
    eb_gamma: float = Field(0.1, description="commit=entropy_bounded: entropy budget per step, nats")
    factor: float = Field(
        1.0, description="commit=factor (Fast-dLLM, arXiv 2505.22618): commit the top n with (n + 1)(1 - c_n) <= f"
    )
    commit_policy: str | None = Field(
        None, description="commit=learned: policy weights (.safetensors); None = the shipped planners/weights one"
    )
    boost: str = Field("none", description="logit boost: none | credit (dInfer's credit decoding, arXiv 2510.08666)")
    credit_alpha: float = Field(0.7, description="boost=credit: logits + alpha * log(1 + credit)")
    credit_gamma: float = Field(0.2, description="boost=credit: each step adds p_top1 ** gamma to the top token")
    credit_decay: float = Field(0.8, description="boost=credit: every credit is multiplied by this each step")
    blocks: str = Field(
        "fixed",
        description="fixed | adaptive (AdaBlock-dLLM, arXiv 2509.26432: a block ends after a confident delimiter; "
        "block-causal planners: only inside a training block); adaptive needs a dynamic commit rule",
    )
    delimiter_threshold: float = Field(0.3, description="blocks=adaptive: a delimiter ends a block at this probability")
    adaptive_window: int | None = Field(
        None, description="blocks=adaptive: positions searched for a delimiter; None = max(block, gen_length / 4)"
    )
    delimiter_ids: tuple[int, ...] | None = Field(
        None, description="blocks=adaptive: delimiter token ids; None = the model's (else the tokenizer's) own"
    )
    remask: str = Field("none", description="none | low_confidence: remask earlier commits whose probability fell")
    remask_threshold: float = Field(0.1, description="remask: committed tokens below this probability")
    remask_fraction: float = Field(0.1, description="remask: at most this fraction of the block per step")
    eos_early_stop: str = Field(
        "inside",
        description="end the span early: off | all (a block of stop ids) | any (a block with one) | inside (a final "
        "stop id, mid-block: the default, same tokens and fewer passes, benchmarks/README.md 'Decoding rules')",
    )
    cache: str = Field("prefix", description="KV cache: none | prefix | dual (Fast-dLLM)")
    precision: str = Field("float32", description="token statistics: float32 | float64 (LLaDA's reference)")
    seed: int | None = Field(0, description="seeds the planner's noise (temperature > 0, confidence=random)")

    @field_validator(*_PLANNER_NAMES)
    @classmethod
    def _names(cls, v: str, info: ValidationInfo) -> str:
        return _check_name(f"planner.{info.field_name}", v, _planner_names(info.field_name))

    @field_validator("adaptive_window", "delimiter_ids", "seed", mode="before")
    @classmethod
    def _optional(cls, v: Any, info: ValidationInfo) -> Any:
        """Strings from the environment: "none" / "null" / "" = None; delimiter ids as "[13, 198]" or "13,198"."""
        if isinstance(v, str):
            text = v.strip()
            if text.lower() in _NONE_WORDS:
                return None
            return _token_ids(text) if info.field_name == "delimiter_ids" else text
        if info.field_name == "delimiter_ids" and isinstance(v, int) and not isinstance(v, bool):
            return (v,)
        return v

    @field_validator("commit_policy")
    @classmethod
    def _commit_policy(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"planner.commit_policy={v!r}: no such file (a .safetensors commit policy)")
        return None if v is None else str(Path(v).expanduser())

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
        try:  # the sampler's own checks (diffusion mode's config, scaled from this one, passes when this one does)
            self.sampler_config("hybrid")
        except (ValueError, OSError) as e:
            raise ValueError(_sampler_error(self, e)) from None
        return self

    def sampler_config(self, mode: str = "hybrid"):
        """The `SamplerConfig` these settings give (every field passed through; the trajectory always recorded).
        Diffusion mode writes the answer itself: `answer_length` tokens, steps scaled to match."""
        from planners.sampler import SamplerConfig

        kw = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(SamplerConfig)
            if f.name in type(self).model_fields
        }
        if mode == "diffusion":
            kw["gen_length"] = self.answer_length
            kw["steps"] = max(1, self.steps * self.answer_length // self.gen_length)
        return SamplerConfig(**kw, record_trajectory=True)


def _sampler_error(p: PlannerSettings, e: Exception) -> str:
    """A SamplerConfig error as one line naming the PlannerSettings field (its messages start with the field)."""
    msg = str(e)
    if isinstance(e, OSError):
        return f"planner.commit_policy={p.commit_policy!r}: {msg}"
    field = re.match(r"\w+", msg)
    return f"planner.{msg}" if field and field.group(0) in PlannerSettings.model_fields else f"planner: {msg}"


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
    defer: bool = Field(
        True,
        description="when score.signal needs no clustering, compute the signals that do (TSE, flip rate, vote) "
        "after the answer: the final state still has them, the time to first token does not pay for them",
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
    prefix_cache: bool = Field(
        True,
        description="embedded llama.cpp: reuse the KV cells of prompt prefixes shared with earlier or running "
        "requests (the chat template and system turn) instead of prefilling them again; same output",
    )
    weights: Literal["auto", "q4_1", "q8_0", "q4_0"] = Field(
        "auto",
        description="embedded llama.cpp: weight type the realizer runs; a type the GGUF does not have is converted "
        "once by llama.cpp's quantiser into the cache directory. auto = q8_0 for the packaged SmolLM2 (its Q4_1 "
        "file converted: half the TTFT, faster batches, same accuracy; q4_0 is faster still but less accurate: "
        "benchmarks/README.md, 'Server'), a GGUF of your own (realizer.model) as it is",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="embedded llama.cpp: CPU threads for decoding and prompts; None = half the cores (1 on a "
        "2-core machine, where 2 threads against any busy neighbour are several times slower)",
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
    planner: PlannerSettings = Field(default_factory=PlannerSettings)  # built (and validated) on use
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
        if re.match(rf"{re.escape(loc)}\b", msg):  # the message names the field itself ("planner.threshold must ...")
            lines.append(msg)
            continue
        lines.append(f"{loc}: {msg}")
    return "invalid configuration: " + "; ".join(lines)
