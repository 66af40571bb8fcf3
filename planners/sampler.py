"""Reverse-diffusion sampler: one denoising loop for every strategy. Token ids only: no tokenizer, no LangGraph.

`denoise(model, x, gen_start=..., config=...)` fills every mask id of x (B, L) — in the generation span
[gen_start, L) and, for infilling, anywhere before it — and returns the tokens with their cost (NFE, steps,
tokens per step, timings) and, if asked, one `Trajectory` per row. `sample` builds [left-padded prompt | masks]
for a batch of prompts; `infill` fills the masked slots of templates (a JSON skeleton, a revision).

The pipeline of one step (the span is cut into blocks of `block_length`; blocks run left to right):
  1. forward the window the cache strategy asks for (CFG: conditional + unconditional rows in one batch);
  2. align predictions with positions (`config.shift`: position p reads the logits at p - 1) — in `_aligned`;
  3. per position of the block: token (argmax, or Gumbel-max with float64 noise), prob, entropy, margin;
  4. confidence -> position calibration -> the commit rule picks positions (count schedules, thresholds);
  5. write the committed tokens; optionally remask low-confidence earlier commits; record the step.
After a block: rows whose block is all stop ids (or, by option, contains one) get the rest of their span
filled with EOS, which ends their work.

What it does not know: which model family it runs (that is `BackboneConfig`: mask / stop ids, shift,
attention pattern) or what the tokens mean. Strategies live in `planners.strategies`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from planners.model import DiffusionBackbone, KVCache, attention_mask, position_ids_from_valid
from planners.recorder import StepClock, StepRecorder
from planners.strategies import (
    CACHES,
    COMMITS,
    CONFIDENCES,
    COUNTED_COMMITS,
    EARLY_STOPS,
    NEG_INF,
    PRECISIONS,
    REMASKS,
    SCHEDULES,
    Cache,
    Commit,
    CommitInputs,
    Confidence,
    EarlyStop,
    Precision,
    Remask,
    Schedule,
    Window,
    calibrate,
)
from planners.trajectory import Trajectory

__all__ = ["BlockDone", "SampleOutput", "SamplerConfig", "denoise", "infill", "sample"]


def _one_of(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not a known strategy; valid: {sorted(valid)}")


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings, validated once at construction (see the module docstring for the step pipeline).

    steps is the total step budget: count-based commits (static, dilated) run exactly steps / num_blocks steps
    per block; dynamic ones (threshold, entropy_bounded) stop a block as soon as it has no masks and commit
    whatever is left on its last allowed step."""

    gen_length: int = 128
    steps: int = 128
    block_length: int | None = None  # None: = gen_length (fully parallel, kept None by replace); else semi-AR
    temperature: float = 0.0  # Gumbel-max over float64 uniform noise (LLaDA)
    cfg_scale: float = 0.0  # CFG: logits = un + (w + 1)(cond - un), un = prompt masked; 2 NFE per step
    confidence: Confidence = "max_prob"
    position_calibration: float = 0.0  # score = conf - strength * offset / block_length (0: off)
    commit: Commit = "static"
    schedule: Schedule = "llada"  # tokens per step for counted commits: LLaDA's counts or Dream's timesteps
    schedule_eps: float = 1e-3  # Dream's final timestep
    threshold: float = 0.9  # commit="threshold": tau (in the confidence's units)
    eb_gamma: float = 0.1  # commit="entropy_bounded": entropy budget per step, nats
    commit_policy: str | None = None  # commit="learned": policy weights (.safetensors); None = the shipped one
    remask: Remask = "none"
    remask_threshold: float = 0.1  # remask committed tokens whose current probability is below this ...
    remask_fraction: float = 0.1  # ... at most this fraction of the block per step; each position once
    eos_early_stop: EarlyStop = "all"  # after a block that is all stop ids ("any": contains one): fill with EOS
    cache: Cache = "none"
    precision: Precision = "float32"  # "float64": LLaDA's reference arithmetic for the token statistics
    record_trajectory: bool = False
    seed: int | None = None  # seeds the noise generator when denoise gets none

    def __post_init__(self) -> None:
        for name in ("gen_length", "steps", "block_length"):
            v = getattr(self, name)
            if name == "block_length" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        _one_of("confidence", self.confidence, CONFIDENCES)
        _one_of("commit", self.commit, COMMITS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("remask", self.remask, REMASKS)
        _one_of("cache", self.cache, CACHES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("eos_early_stop", self.eos_early_stop, EARLY_STOPS)
        if self.block > self.gen_length:
            raise ValueError(f"block_length={self.block_length} exceeds gen_length={self.gen_length}")
        if self.gen_length % self.block:
            raise ValueError(
                f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length} (LLaDA's rule)"
            )
        nb = self.num_blocks
        if self.commit in COUNTED_COMMITS and self.steps % nb:
            raise ValueError(
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"gen_length / block_length = {nb} for commit={self.commit!r} (LLaDA's rule)"
            )
        if self.steps < nb:
            raise ValueError(f"steps={self.steps} is fewer than the {nb} blocks; each block needs a step")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not math.isfinite(self.position_calibration):
            raise ValueError(f"position_calibration must be finite, got {self.position_calibration}")
        if not 0 < self.schedule_eps < 1:
            raise ValueError(f"schedule_eps must be in (0, 1), got {self.schedule_eps}")
        if self.confidence in ("max_prob", "margin", "random") and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] for confidence={self.confidence!r}, got {self.threshold}")
        if self.commit == "learned":
            from planners.commit_policy import load_commit_policy

            load_commit_policy(self.commit_policy)  # a missing or unreadable file fails here, by name
        if not self.eb_gamma > 0:
            raise ValueError(f"eb_gamma must be > 0, got {self.eb_gamma}")
        if not 0 <= self.remask_threshold <= 1:
            raise ValueError(f"remask_threshold must be in [0, 1], got {self.remask_threshold}")
        if not 0 <= self.remask_fraction <= 1:
            raise ValueError(f"remask_fraction must be in [0, 1], got {self.remask_fraction}")

    @property
    def block(self) -> int:
        """The block length in force: block_length, or gen_length when it is None (fully parallel)."""
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SampleOutput:
    """Result and cost of one batched denoising run."""

    tokens: torch.Tensor  # (B, gen_length) int64, the final span (before EOS truncation)
    lengths: list[int]  # per row: tokens before the first stop id (the answer's length)
    sequences: torch.Tensor  # (B, L) the whole final sequence (prompt region included: infilled masks there)
    nfe: int  # forward passes (CFG counts 2 per step)
    steps: int  # denoising steps run
    step_seconds: list[float]  # wall time per step (CUDA events on GPU: no host sync in the loop)
    tokens_per_step: torch.Tensor  # (steps, B) int64: tokens committed per step per row
    seconds: float  # total wall time
    trajectories: list[Trajectory] | None = None

    def answers(self) -> list[list[int]]:
        """Per row, the span's tokens before the first stop id."""
        rows = self.tokens.tolist()
        return [r[:n] for r, n in zip(rows, self.lengths, strict=True)]


@dataclass(frozen=True)
class BlockDone:
    """A block that just became final, as `denoise(on_block=...)` reports it."""

    block: int  # index of the block in the span
    final: int  # span positions [0, final) are final (the block's end, relative to gen_start)
    span: torch.Tensor  # (B, gen_length) on the host: tokens so far (mask ids after `final`)
    nfe: int  # forward passes spent so far
    seconds: float  # since denoise was called
    ended: bool  # every row has a stop id in its final part, or this was the last block: nothing more to say


BlockCallback = Callable[[BlockDone], bool | None]


# ----------------------------------------------------------------------------- step pieces


@dataclass
class _Run:
    """Per-call constants of one denoise run (built once, read by every step)."""

    model: DiffusionBackbone
    config: SamplerConfig
    length: int
    gen_start: int
    mask_id: int
    shift: int  # 1: position p is predicted by the logits at p - 1
    causal: bool  # attention pattern hides later positions from earlier ones (causal / block_causal)
    exclude: torch.Tensor  # (1,) the mask id: never a candidate token
    pos_ids: torch.Tensor  # (B', L); B' = 2B with CFG
    attn: torch.Tensor | None  # (B', 1, L, L) bool, or None for full attention without padding
    uncond_fixed: torch.Tensor  # (B, L) bool: what CFG's unconditional rows mask
    cache: KVCache | Any  # None without a cache; a torch KVCache, or an engine's handle (model.new_cache)
    generator: torch.Generator | None


def _forward(run: _Run, x: torch.Tensor, win: Window, final: int) -> torch.Tensor:
    """Logits (B, end - start, V) for the window; positions before `final` hold final tokens (engines that
    keep only final K/V use it). With CFG the unconditional rows (initially fixed tokens masked: LLaDA's
    `prompt_index`) run in the same batch and are combined as un + (w + 1)(cond - un)."""
    a, b = win.start, win.end
    ids = x[:, a:b]
    w = run.config.cfg_scale
    if w > 0:
        ids = torch.cat([ids, ids.masked_fill(run.uncond_fixed[:, a:b], run.mask_id)])
    logits = run.model(
        ids,
        attention_mask=None if run.attn is None else run.attn[:, :, a:b],
        position_ids=run.pos_ids[:, a:b],
        cache=run.cache,
        cache_start=a if run.cache is not None else 0,
        final=final,
    )
    if w > 0:
        cond, un = logits.chunk(2)
        logits = un + (w + 1) * (cond - un)
    return logits


def _aligned(logits: torch.Tensor, start: int, lo: int, hi: int, shift: int) -> torch.Tensor:
    """The logits that predict positions [lo, hi), from logits computed for positions [start, ...).

    THE one place the shift is handled: with shift, position p reads the logits at p - 1 (Dream; adapted AR
    models), so a block's first position reads the last prompt / previous-block position (with a cache too:
    every window starts at lo - shift); position 0 has no predecessor and reads itself (Dream duplicates
    logits[:, :1]). A view, unless position 0 is involved."""
    src = lo - shift
    if src >= start:
        return logits[:, src - start : hi - shift - start]
    assert start == 0 and lo == 0, "the window must start at or before lo - shift"
    return torch.cat([logits[:, :1], logits[:, : hi - shift]], dim=1)


def _predicted_span(run: _Run, win: Window) -> tuple[int, int]:
    """Span positions [pl, ph) whose predictions a forward over `win` produced."""
    pl = max(run.gen_start, win.start + run.shift if win.start > 0 else 0)
    return pl, min(run.length, win.end + run.shift)


def _remask(run: _Run, x_blk, preds, commit, by_sampler, remasked_once) -> torch.Tensor | None:
    """Bounded remasking of the block's earlier commits (x_blk: the block's tokens before this step)."""
    k = int(run.config.remask_fraction * x_blk.shape[1])
    if k == 0:
        return None
    eligible = by_sampler & ~remasked_once & ~commit
    logp = torch.log_softmax(preds.float().index_fill(-1, run.exclude, NEG_INF), -1)  # as the candidates saw it
    p_now = logp.gather(-1, x_blk.unsqueeze(-1)).squeeze(-1).exp()  # (B, W)
    p_now = p_now.masked_fill(~eligible, 1.0)  # mask ids sit there, not committed tokens
    return REMASKS[run.config.remask](p_now, eligible, threshold=run.config.remask_threshold, max_count=k)


def _check_model(model: DiffusionBackbone, config: SamplerConfig) -> None:
    mc = model.config
    if mc.attention == "block_causal" and config.block != mc.block_size:
        raise ValueError(
            f"block_length={config.block}, but the model's block_causal attention uses blocks of "
            f"block_size={mc.block_size}: set SamplerConfig.block_length={mc.block_size}"
        )


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def denoise(
    model: DiffusionBackbone,
    x: torch.Tensor,
    *,
    gen_start: int,
    config: SamplerConfig,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_block: BlockCallback | None = None,
) -> SampleOutput:
    """Fill every mask id of x (B, L); x itself is not modified.

    gen_start: where the generation span starts (the same for all rows: prompts are left-padded to one
    length); the span [gen_start, L) must be config.gen_length long and is cut into blocks. Fixed tokens may
    sit anywhere in it (infilling, revision); masks before gen_start (a prompt with masked slots) are filled
    together with the first block (they are not part of the trajectory, which covers the span).
    valid: (B, L) bool, False at padding (default: all real). generator: the noise source (default: a
    generator seeded with config.seed, else torch's global one).
    on_block: called after each block is final (its tokens never change again: semi-autoregressive decoding)
    with a `BlockDone` — the span so far on the host, the NFE spent, the seconds since the call — so callers
    can stream finished blocks (a plan as it forms, diffusion mode's answer). One host read per block, only
    when given; return True from it to stop after this block (e.g. a client went away)."""
    t0 = time.perf_counter()
    mc, cfg = model.config, config
    _check_model(model, cfg)
    if x.dim() != 2:
        raise ValueError(f"x must be (B, L) token ids, got shape {tuple(x.shape)}")
    bsz, length = x.shape
    if not 0 <= gen_start < length or length - gen_start != cfg.gen_length:
        raise ValueError(f"the span [gen_start={gen_start}, L={length}) must hold gen_length={cfg.gen_length}")
    dev = x.device
    x = x.clone()
    valid = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.to(device=dev, dtype=torch.bool)
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device=dev).manual_seed(cfg.seed)
    mask_id, shift, cfg2 = mc.mask_token_id, int(mc.shift), 2 if cfg.cfg_scale > 0 else 1
    masked0 = (x == mask_id) & valid
    attn = None
    if mc.attention != "full" or not bool(valid.all()):  # one host read, before the loop
        attn = attention_mask(valid, pattern=mc.attention, gen_start=gen_start, block_size=mc.block_size)
    cache = None
    if cfg.cache != "none":  # the model's own kind of cache: a torch KVCache, or an engine's handle
        cache = model.new_cache(valid.repeat(cfg2, 1), gen_start=gen_start)
    run = _Run(
        model=model,
        config=cfg,
        length=length,
        gen_start=gen_start,
        mask_id=mask_id,
        shift=shift,
        causal=mc.attention != "full",
        exclude=torch.tensor([mask_id], device=dev),
        pos_ids=position_ids_from_valid(valid).repeat(cfg2, 1),
        attn=None if attn is None else attn.repeat(cfg2, 1, 1, 1),
        uncond_fixed=valid & ~masked0,
        cache=cache,
        generator=generator,
    )
    stop_ids = torch.tensor(mc.stop_ids, device=dev)
    stats_fn = PRECISIONS[cfg.precision]
    conf_fn, commit_fn, window_fn = CONFIDENCES[cfg.confidence], COMMITS[cfg.commit], CACHES[cfg.cache]
    counted = cfg.commit in COUNTED_COMMITS
    policy = None
    if cfg.commit == "learned":
        from planners.commit_policy import load_commit_policy

        policy = load_commit_policy(cfg.commit_policy, dev)

    cols = masked0.any(0).nonzero()
    first_masked = int(cols[0]) if len(cols) else gen_start  # host read, once
    bl = cfg.block
    blocks = [(gen_start + k * bl, gen_start + (k + 1) * bl) for k in range(cfg.num_blocks)]
    blocks[0] = (min(first_masked, gen_start), blocks[0][1])

    by_sampler = torch.zeros_like(masked0)  # positions this run committed (remasking may revisit them)
    remasked_once = torch.zeros_like(masked0)
    rec = StepRecorder(x, gen_start, mask_id) if cfg.record_trajectory else None
    per_step: list[torch.Tensor] = []
    clock = StepClock(dev)
    fresh = 0  # causal patterns with a cache: K/V before this position are final
    steps, spb = 0, cfg.steps_per_block

    for block, (lo, hi) in enumerate(blocks):
        blk_masked = (x[:, lo:hi] == mask_id) & valid[:, lo:hi]
        if not bool(blk_masked.any()):  # one host read per block: nothing to fill here
            continue
        m_start = blk_masked.sum(-1)
        for i in range(spb):
            if i > 0:
                blk_masked = (x[:, lo:hi] == mask_id) & valid[:, lo:hi]
                if not counted and not bool(blk_masked.any()):  # dynamic rules: the block is done (host read)
                    break
            win = window_fn(refresh=i == 0, lo=lo, hi=hi, length=length, shift=shift, causal=run.causal, fresh=fresh)
            logits = _forward(run, x, win, lo)
            if cache is not None and i == 0:
                fresh = lo  # this refresh recomputed [fresh, lo) from final tokens
            preds = _aligned(logits, win.start, lo, hi, shift)  # (B, W, V)
            u = None
            if cfg.temperature > 0:  # LLaDA: uniform noise in float64 (arXiv 2409.02908)
                u = torch.rand(preds.shape, generator=generator, device=dev, dtype=torch.float64)
            st = stats_fn(preds, temperature=cfg.temperature, u=u, exclude_ids=run.exclude)
            conf = conf_fn(st, generator)
            if i == spb - 1:
                commit = blk_masked  # a block's last step leaves no mask behind
            else:
                score = torch.where(blk_masked, calibrate(conf, cfg.position_calibration), NEG_INF)
                count = None
                if counted:
                    count = SCHEDULES[cfg.schedule](blk_masked.sum(-1), m_start, i, spb, cfg.schedule_eps)
                extra = {}
                if policy is not None:  # what the learned rule reads (planners.commit_policy.features)
                    left = x[:, lo - 1 : lo] if lo > 0 else torch.full_like(x[:, :1], mask_id)
                    extra = dict(stats=st, context=torch.cat([left, x[:, lo:hi]], 1), step=i, block=block,
                                 num_blocks=len(blocks), stop_ids=stop_ids, policy=policy)  # fmt: skip
                commit = commit_fn(
                    CommitInputs(score, conf, st.entropy, blk_masked, count, cfg.threshold, cfg.eb_gamma, **extra)
                )
            x_blk = x[:, lo:hi].clone() if rec is not None or cfg.remask != "none" else None
            span_before = x[:, gen_start:].clone() if rec is not None else None
            x[:, lo:hi] = torch.where(commit, st.token, x[:, lo:hi])
            remasked = None
            if cfg.remask != "none":
                if i < spb - 1:
                    remasked = _remask(run, x_blk, preds, commit, by_sampler[:, lo:hi], remasked_once[:, lo:hi])
                by_sampler[:, lo:hi] |= commit
                if remasked is not None:
                    x[:, lo:hi] = x[:, lo:hi].masked_fill(remasked, mask_id)
                    remasked_once[:, lo:hi] |= remasked
                    by_sampler[:, lo:hi] &= ~remasked
            per_step.append(commit.sum(-1))
            if rec is not None:
                pl, ph = _predicted_span(run, win)
                if ph > pl:
                    greedy = stats_fn(_aligned(logits, win.start, pl, ph, shift), exclude_ids=run.exclude)
                    rec.observe(pl, ph, greedy.token, greedy.entropy)
                after = x[:, gen_start:]
                rec.step(block, lo, hi, span_before, after, commit=commit, prob=st.prob, remasked=remasked)
            steps += 1
            clock.mark()
        if cfg.eos_early_stop != "off":  # rows whose finished block is all (any) stop ids: fill the rest with EOS
            is_stop = torch.isin(x[:, max(lo, gen_start) : hi], stop_ids)
            done = is_stop.all(-1) if cfg.eos_early_stop == "all" else is_stop.any(-1)
            fill = done[:, None] & (x[:, hi:] == mask_id)
            x[:, hi:] = x[:, hi:].masked_fill(fill, mc.eos_token_id)
            if rec is not None:
                rec.filled(torch.cat([torch.zeros_like(x[:, gen_start:hi], dtype=torch.bool), fill], 1))
        if on_block is not None:
            span = x[:, gen_start:].cpu()  # (B, gen_length): final up to hi - gen_start (one host read per block)
            ended = bool(torch.isin(span[:, : hi - gen_start], stop_ids.cpu()).any(-1).all())
            ended = ended or block == len(blocks) - 1
            done = BlockDone(block, hi - gen_start, span, steps * cfg2, time.perf_counter() - t0, ended)
            if on_block(done) and not ended:
                x[:, hi:] = x[:, hi:].masked_fill(x[:, hi:] == mask_id, mc.eos_token_id)  # stop: rest is EOS
                break

    step_seconds = clock.seconds()
    tokens = x[:, gen_start:].clone()
    is_stop = torch.isin(tokens, stop_ids)
    lengths = torch.where(is_stop.any(-1), is_stop.int().argmax(-1), cfg.gen_length).tolist()
    nfe = steps * cfg2
    trajectories = None
    if rec is not None:
        meta = {"sampler": cfg.to_dict(), "arch": mc.arch, "attention": mc.attention, "shift": mc.shift}
        trajectories = rec.trajectories(x, valid, nfe, step_seconds, meta)
    return SampleOutput(
        tokens=tokens,
        lengths=lengths,
        sequences=x,
        nfe=nfe,
        steps=steps,
        step_seconds=step_seconds,
        tokens_per_step=torch.stack(per_step).cpu() if per_step else torch.zeros(0, bsz, dtype=torch.long),
        seconds=time.perf_counter() - t0,
        trajectories=trajectories,
    )


# ----------------------------------------------------------------------------- entry points


def _pad_id(model: DiffusionBackbone) -> int:
    mc = model.config
    return mc.pad_token_id if mc.pad_token_id is not None and mc.pad_token_id != mc.mask_token_id else mc.eos_token_id


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[i, width - len(r) :] = True
    return ids, valid


def _device(model: DiffusionBackbone) -> torch.device:
    return model.device


def sample(
    model: DiffusionBackbone,
    prompts: list[list[int]],
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    on_block: BlockCallback | None = None,
) -> SampleOutput:
    """Generate config.gen_length tokens after each prompt: x = [left padding | prompt | masks], one batch
    (`on_block` as in `denoise`)."""
    if not prompts:
        raise ValueError("prompts is empty")
    if model.config.shift and any(len(p) == 0 for p in prompts):
        raise ValueError(
            "a shifted model (config.shift) predicts from the previous position: prompts must be non-empty"
        )
    ids, valid = _left_pad([list(p) for p in prompts], _pad_id(model))
    masks = torch.full((len(prompts), config.gen_length), model.config.mask_token_id, dtype=torch.long)
    x = torch.cat([ids, masks], 1)
    valid = torch.cat([valid, torch.ones_like(masks, dtype=torch.bool)], 1)
    dev = _device(model)
    return denoise(
        model,
        x.to(dev),
        gen_start=ids.shape[1],
        config=config,
        valid=valid.to(dev),
        generator=generator,
        on_block=on_block,
    )


def infill(
    model: DiffusionBackbone,
    template_ids: list[int] | list[list[int]],
    config: SamplerConfig,
    *,
    prompts: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Fill the mask ids of templates (fixed tokens stay): x = [left padding | prompt | template], the template
    being the span. Shorter templates are right-padded with EOS (fixed). config.gen_length is replaced by the
    template length; a fully parallel config (block_length == gen_length) stays fully parallel."""
    templates = [template_ids] if template_ids and isinstance(template_ids[0], int) else template_ids
    templates = [list(t) for t in templates]  # type: ignore[arg-type]
    if not templates or not all(templates):
        raise ValueError("template_ids must hold at least one non-empty template")
    prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in templates]
    if len(prompts) != len(templates):
        raise ValueError(f"{len(prompts)} prompts for {len(templates)} templates")
    mask_id = model.config.mask_token_id
    if model.config.shift and any(not p and t[0] == mask_id for p, t in zip(prompts, templates, strict=True)):
        raise ValueError("a shifted model cannot predict a masked first template token without a prompt")
    span = max(len(t) for t in templates)
    eos = model.config.eos_token_id
    block = None if config.block == config.gen_length else config.block_length
    config = dataclasses.replace(config, gen_length=span, block_length=block)
    ids, valid = _left_pad(prompts, _pad_id(model))
    tmpl = torch.tensor([t + [eos] * (span - len(t)) for t in templates], dtype=torch.long)
    x = torch.cat([ids, tmpl], 1)
    valid = torch.cat([valid, torch.ones_like(tmpl, dtype=torch.bool)], 1)
    dev = _device(model)
    return denoise(model, x.to(dev), gen_start=ids.shape[1], config=config, valid=valid.to(dev), generator=generator)
