"""Reverse-diffusion sampler: one denoising loop for every strategy. Token ids only: no tokenizer, no LangGraph.

`denoise(model, x, gen_start=..., config=...)` fills every mask id of x (B, L) — in the generation span
[gen_start, L) and, for infilling, anywhere before it — and returns the tokens with their cost (NFE, steps,
tokens per step, timings) and, if asked, one `Trajectory` per row. `sample` builds [left-padded prompt | masks]
for a batch of prompts; `infill` fills the masked slots of templates (a JSON skeleton, a revision).

The pipeline of one step (the span is cut into blocks of `block_length`; blocks run left to right):
  1. forward the window the cache strategy asks for (CFG: conditional + unconditional rows in one batch);
  2. align predictions with positions (`config.shift`: position p reads the logits at p - 1) — in `_aligned`;
     adaptive blocks (`blocks="adaptive"`, AdaBlock) decide here, at a block's first step, where it ends;
  3. optionally boost the logits (`boost="credit"`: dInfer's credit for tokens predicted again and again);
  4. per position of the block: token (argmax, or Gumbel-max with float64 noise), prob, entropy, margin;
  5. confidence -> position calibration -> the commit rule picks positions (count schedules, thresholds in the
     confidence's units, Fast-dLLM's factor rule, a learned policy);
  6. write the committed tokens; optionally remask low-confidence earlier commits; record the step; with
     `eos_early_stop="inside"`, what follows a stop id whose left side is final becomes EOS at once.
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

from kernels.sampling_stats import TokenStats
from planners.model import DiffusionBackbone, KVCache, attention_mask, position_ids_from_valid
from planners.recorder import StepClock, StepRecorder
from planners.strategies import (
    BLOCK_RULES,
    BOOSTS,
    CACHES,
    COMMITS,
    CONFIDENCES,
    COUNTED_COMMITS,
    EARLY_STOPS,
    NEG_INF,
    PRECISIONS,
    REMASKS,
    SCHEDULES,
    Blocks,
    Boost,
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
    stop_inside,
    threshold_in_conf,
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
    threshold: float = 0.9  # commit="threshold": tau, in the confidence's units (probability; entropy: nats)
    eb_gamma: float = 0.1  # commit="entropy_bounded": entropy budget per step, nats
    factor: float = 1.0  # commit="factor": Fast-dLLM's f (commit the largest n with (n + 1)(1 - c_n) <= f)
    commit_policy: str | None = None  # commit="learned": policy weights (.safetensors); None = the shipped one
    boost: Boost = "none"  # "credit": dInfer's credit decoding boosts tokens predicted repeatedly
    credit_alpha: float = 0.7  # boost="credit": logits + alpha * log(1 + credit)
    credit_gamma: float = 0.2  # ... each step adds p_top1 ** gamma to the top-1 token's credit ...
    credit_decay: float = 0.8  # ... after multiplying every credit by decay
    blocks: Blocks = "fixed"  # "adaptive": AdaBlock's blocks end after a confident delimiter
    delimiter_threshold: float = 0.3  # blocks="adaptive": a delimiter ends a block at this probability
    adaptive_window: int | None = None  # blocks="adaptive": positions searched (None: max(block, gen_length / 4))
    delimiter_ids: tuple[int, ...] | None = None  # blocks="adaptive": None = the model config's delimiter ids
    remask: Remask = "none"
    remask_threshold: float = 0.1  # remask committed tokens whose current probability is below this ...
    remask_fraction: float = 0.1  # ... at most this fraction of the block per step; each position once
    eos_early_stop: EarlyStop = "all"  # after a block that is all stop ids ("any": contains one): fill with EOS;
    # "inside": as soon as a stop id and everything before it are final, even mid-block
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
        _one_of("boost", self.boost, BOOSTS)
        _one_of("blocks", self.blocks, BLOCK_RULES)
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
        if self.confidence == "entropy":
            if not (self.threshold >= 0 and math.isfinite(self.threshold)):
                raise ValueError(
                    f"threshold must be a finite number of nats >= 0 for confidence='entropy' (commit where the "
                    f"token entropy is at most threshold), got {self.threshold}"
                )
        elif not 0 < self.threshold <= 1:
            raise ValueError(
                f"threshold must be a probability in (0, 1] for confidence={self.confidence!r}, got {self.threshold}"
            )
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor}")
        if self.commit == "factor" and self.confidence not in ("max_prob", "margin"):
            raise ValueError(
                f"commit='factor' reads confidences as probabilities (1 - c); confidence={self.confidence!r} is not "
                "one: use confidence='max_prob' or 'margin'"
            )
        if not (self.credit_alpha >= 0 and math.isfinite(self.credit_alpha)):
            raise ValueError(f"credit_alpha must be a finite number >= 0, got {self.credit_alpha}")
        if not (self.credit_gamma > 0 and math.isfinite(self.credit_gamma)):
            raise ValueError(f"credit_gamma must be a finite number > 0, got {self.credit_gamma}")
        if not 0 <= self.credit_decay <= 1:
            raise ValueError(f"credit_decay must be in [0, 1], got {self.credit_decay}")
        if not 0 < self.delimiter_threshold <= 1:
            raise ValueError(f"delimiter_threshold must be a probability in (0, 1], got {self.delimiter_threshold}")
        aw = self.adaptive_window
        if aw is not None and (not isinstance(aw, int) or isinstance(aw, bool) or aw < 1):
            raise ValueError(f"adaptive_window must be a positive integer or None, got {self.adaptive_window!r}")
        if self.delimiter_ids is not None:
            ids = tuple(self.delimiter_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"delimiter_ids must be token ids (integers >= 0), got {self.delimiter_ids!r}")
            object.__setattr__(self, "delimiter_ids", ids)
        if self.blocks == "adaptive" and self.commit in COUNTED_COMMITS:
            raise ValueError(
                f"blocks='adaptive' needs a dynamic commit rule (threshold, factor, entropy_bounded, learned): "
                f"commit={self.commit!r} counts its tokens per step from a fixed block length"
            )
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


def _wanted(run: _Run, x: torch.Tensor, win: Window) -> torch.Tensor:
    """(B, W) bool: the window rows whose predictions a step reads, those that predict a masked position (with
    the shift, row p predicts p + 1; position 0 also reads row 0). The rest are final positions' predictions,
    which nothing reads when neither remasking nor credit boosting looks back at committed tokens."""
    a, b, sh = win.start, win.end, run.shift
    want = torch.zeros(x.shape[0], b - a, dtype=torch.bool, device=x.device)
    hi = min(b + sh, run.length)
    want[:, : hi - a - sh] = x[:, a + sh : hi] == run.mask_id
    if a == 0 and sh:
        want[:, 0] |= x[:, 0] == run.mask_id
    return want


def _forward(run: _Run, x: torch.Tensor, win: Window, final: int, sparse: bool = False) -> torch.Tensor:
    """Logits (B, end - start, V) for the window; positions before `final` hold final tokens (engines that
    keep only final K/V use it). With CFG the unconditional rows (initially fixed tokens masked: LLaDA's
    `prompt_index`) run in the same batch and are combined as un + (w + 1)(cond - un).
    sparse: tell a model that computes only the rows asked for (`model.sparse_logits`, the llama.cpp engine)
    which rows the step reads (`_wanted`); the others come back as zeros (finite statistics nobody reads)."""
    a, b = win.start, win.end
    ids = x[:, a:b]
    w = run.config.cfg_scale
    if w > 0:
        ids = torch.cat([ids, ids.masked_fill(run.uncond_fixed[:, a:b], run.mask_id)])
    extra = {}
    if sparse:
        want = _wanted(run, x, win)
        extra["outputs"] = want.repeat(2, 1) if w > 0 else want
    logits = run.model(
        ids,
        attention_mask=None if run.attn is None else run.attn[:, :, a:b],
        position_ids=run.pos_ids[:, a:b],
        cache=run.cache,
        cache_start=a if run.cache is not None else 0,
        final=final,
        **extra,
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


def _block_attn(valid: torch.Tensor, mc, gen_start: int, starts: list[int], copies: int) -> torch.Tensor:
    """Block-causal attention whose span blocks start at `starts` (adaptive block ends), CFG copies stacked."""
    attn = attention_mask(valid, pattern="block_causal", gen_start=gen_start, block_size=mc.block_size,
                          block_starts=starts)  # fmt: skip
    return attn.repeat(copies, 1, 1, 1)


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
    inside = cfg.eos_early_stop == "inside"
    policy = None
    if cfg.commit == "learned":
        from planners.commit_policy import load_commit_policy

        policy = load_commit_policy(cfg.commit_policy, dev)

    cols = masked0.any(0).nonzero()
    first_masked = int(cols[0]) if len(cols) else gen_start  # host read, once
    bl = cfg.block
    block_causal = mc.attention == "block_causal"
    adaptive = cfg.blocks == "adaptive"
    end_rule = BLOCK_RULES[cfg.blocks]
    boost = BOOSTS[cfg.boost]
    thr = cfg.threshold if cfg.commit == "learned" else threshold_in_conf(cfg.confidence, cfg.threshold)
    delims = None
    if adaptive:
        ids = cfg.delimiter_ids if cfg.delimiter_ids is not None else mc.delimiter_ids
        if not ids:
            raise ValueError(
                "blocks='adaptive' needs delimiter token ids: set SamplerConfig.delimiter_ids or the model config's "
                "delimiter_ids (planners.planner.Planner fills them from its tokenizer)"
            )
        delims = torch.tensor(ids, device=dev)
    window = cfg.adaptive_window or max(bl, cfg.gen_length // 4)
    # models that compute only the rows asked for get told which (`_wanted`), unless a rule reads committed rows
    sparse = bool(getattr(model, "sparse_logits", False)) and cfg.remask == "none" and boost is None and not adaptive

    by_sampler = torch.zeros_like(masked0)  # positions this run committed (remasking may revisit them)
    remasked_once = torch.zeros_like(masked0)
    rec = StepRecorder(x, gen_start, mask_id) if cfg.record_trajectory else None
    per_step: list[torch.Tensor] = []
    clock = StepClock(dev)
    fresh = 0  # causal patterns with a cache: K/V before this position are final
    steps = 0
    starts: list[int] = []  # span block starts so far (adaptive blocks of a block-causal model: its attention)

    def grid_end(p: int) -> int:  # end of the fixed block holding position p (a masked prompt: the first block)
        return gen_start + ((max(p, gen_start) - gen_start) // bl + 1) * bl

    lo, block = min(first_masked, gen_start), -1
    while lo < length:
        block += 1
        # this block's end: the fixed grid, or (adaptive) decided at its first step, at most `limit`
        sized = adaptive and lo >= gen_start
        limit = grid_end(lo) if block_causal or not sized else length
        hi = grid_end(lo) if not sized else min(lo + bl, length)
        if sized:
            hi = min(max(lo + window, hi), limit)  # the first step looks this far ahead
            if block_causal and run.attn is not None:  # block-causal attention follows the sampler's blocks
                run.attn = _block_attn(valid, mc, gen_start, [*starts, lo, limit], cfg2)
        blk_masked = (x[:, lo:hi] == mask_id) & valid[:, lo:hi]
        if not bool(blk_masked.any()):  # one host read per block: nothing to fill here
            if sized:
                hi = min(lo + bl, limit)
            if lo >= gen_start:
                starts.append(lo)
            lo = hi
            continue
        m_start = blk_masked.sum(-1)
        spb = cfg.steps_per_block
        credit = None
        i = 0
        while i < spb:
            if i > 0:
                blk_masked = (x[:, lo:hi] == mask_id) & valid[:, lo:hi]
                if (not counted or inside) and not bool(blk_masked.any()):  # the block is done (host read)
                    break
            win = window_fn(refresh=i == 0, lo=lo, hi=hi, length=length, shift=shift, causal=run.causal, fresh=fresh)
            logits = _forward(run, x, win, lo, sparse)
            if cache is not None and i == 0:
                fresh = lo  # this refresh recomputed [fresh, lo) from final tokens
            look = None
            if sized and i == 0:  # AdaBlock: the block ends after a confident delimiter (one host read)
                ahead = _aligned(logits, win.start, lo, hi, shift)
                look = stats_fn(ahead, exclude_ids=run.exclude)
                hi = end_rule(lo=lo, default_hi=min(lo + bl, limit), limit=limit, window=window, stats=look,
                              masked=blk_masked, delimiter_ids=delims, threshold=cfg.delimiter_threshold)  # fmt: skip
                blk_masked, m_start = blk_masked[:, : hi - lo], blk_masked[:, : hi - lo].sum(-1)
                spb = max(1, math.ceil(cfg.steps * (hi - lo) / cfg.gen_length))
                if block_causal and run.attn is not None:
                    run.attn = _block_attn(valid, mc, gen_start, [*starts, lo, hi], cfg2)
            preds = _aligned(logits, win.start, lo, hi, shift)  # (B, W, V)
            if boost is not None:  # dInfer's credit: logits + alpha log(1 + credit), credit kept per block
                preds = preds.index_fill(-1, run.exclude, NEG_INF)  # the mask id gathers no credit
                preds, credit = boost(preds, blk_masked, credit, alpha=cfg.credit_alpha, gamma=cfg.credit_gamma,
                                      decay=cfg.credit_decay)  # fmt: skip
            u = None
            if cfg.temperature > 0:  # LLaDA: uniform noise in float64 (arXiv 2409.02908)
                u = torch.rand(preds.shape, generator=generator, device=dev, dtype=torch.float64)
            if look is not None and boost is None and u is None:  # the lookahead's statistics cover the block
                st = TokenStats(*(f[:, : hi - lo] for f in look))
            else:
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
                                 span_offset=max(lo - gen_start, 0), num_blocks=cfg.num_blocks, stop_ids=stop_ids,
                                 policy=policy)  # fmt: skip
                commit = commit_fn(
                    CommitInputs(score, conf, st.entropy, blk_masked, count, thr, cfg.eb_gamma, cfg.factor, **extra)
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
                # x0-hat reads predictions of masked positions only: none lie before the block (they are final)
                pl, ph = _predicted_span(run, win)
                pl = max(pl, lo)
                if pl == lo and ph >= hi and cfg.temperature == 0 and boost is None:  # the step's own statistics
                    rec.observe(lo, hi, st.token, st.entropy)
                    pl = hi  # what the window predicts past the block
                if ph > pl:
                    greedy = stats_fn(_aligned(logits, win.start, pl, ph, shift), exclude_ids=run.exclude)
                    rec.observe(pl, ph, greedy.token, greedy.entropy)
                after = x[:, gen_start:]
                rec.step(block, lo, hi, span_before, after, commit=commit, prob=st.prob, remasked=remasked)
            if inside and i < spb - 1:  # end of text inside the block: what follows a settled stop id is EOS
                s0 = max(lo, gen_start)
                settled = ~((x[:, gen_start:s0] == mask_id) & valid[:, gen_start:s0]).any(-1)
                blk = x[:, s0:hi]
                fill = stop_inside(blk, (blk == mask_id) & valid[:, s0:hi], stop_ids, settled)
                x[:, s0:hi] = blk.masked_fill(fill, mc.eos_token_id)
                if rec is not None:
                    span_fill = torch.zeros_like(x[:, gen_start:], dtype=torch.bool)
                    span_fill[:, s0 - gen_start : hi - gen_start] = fill
                    rec.filled(span_fill)
            steps += 1
            i += 1
            clock.mark()
        if cfg.eos_early_stop != "off":  # rows whose finished block is all (any) stop ids: fill the rest with EOS
            is_stop = torch.isin(x[:, max(lo, gen_start) : hi], stop_ids)
            done = is_stop.all(-1) if cfg.eos_early_stop == "all" else is_stop.any(-1)
            fill = done[:, None] & (x[:, hi:] == mask_id)
            x[:, hi:] = x[:, hi:].masked_fill(fill, mc.eos_token_id)
            if rec is not None:
                rec.filled(torch.cat([torch.zeros_like(x[:, gen_start:hi], dtype=torch.bool), fill], 1))
        if lo >= gen_start:
            starts.append(lo)
        if on_block is not None:
            span = x[:, gen_start:].cpu()  # (B, gen_length): final up to hi - gen_start (one host read per block)
            ended = bool(torch.isin(span[:, : hi - gen_start], stop_ids.cpu()).any(-1).all())
            ended = ended or hi >= length
            done = BlockDone(block, hi - gen_start, span, steps * cfg2, time.perf_counter() - t0, ended)
            if on_block(done) and not ended:
                x[:, hi:] = x[:, hi:].masked_fill(x[:, hi:] == mask_id, mc.eos_token_id)  # stop: rest is EOS
                break
        lo = hi

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
