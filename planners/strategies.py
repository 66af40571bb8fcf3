"""Strategy registries for the reverse-diffusion sampler: statistics precision, confidence, count schedule,
commit rule, remasking and KV-cache windows.

Each strategy is a small pure function over the tensors of one denoising step, registered under a `Literal`
name; `planners.sampler.SamplerConfig` checks names against these registries when it is built. Nothing here
runs a model or loops over steps: the one loop lives in `planners.sampler`. Shapes: B rows, W positions of
the current block, V vocabulary. Every function works on whole batches with tensor ops (no per-row Python,
no host reads), so the loop stays free of host syncs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.sampling_stats import TokenStats, token_stats

Precision = Literal["float32", "float64"]
Confidence = Literal["random", "max_prob", "entropy", "margin"]
Schedule = Literal["llada", "dream"]
Commit = Literal["static", "threshold", "factor", "dilated", "entropy_bounded", "learned"]
Remask = Literal["none", "low_confidence"]
Cache = Literal["none", "prefix", "dual"]
EarlyStop = Literal["off", "all", "any", "inside"]
Boost = Literal["none", "credit"]
Blocks = Literal["fixed", "adaptive"]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- statistics precision


def token_stats_float64(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    u: torch.Tensor | None = None,
    seed: int | None = None,
    exclude_ids: torch.Tensor | Sequence[int] | None = None,
) -> TokenStats:
    """`token_stats` in float64: LLaDA's reference arithmetic (generate.py: "low-precision Gumbel-max ...
    reduces generation quality. Thus, we use float64", after arXiv 2409.02908).

    token = argmax(exp(l) / (-log u)^T), taken in the log domain as argmax(l - T log(-log u)) so large logits
    cannot overflow (a monotone transform: same argmax); prob = softmax(l)[token] with l in float64.
    Fields come back as int64 / float64. `seed` is accepted for signature parity and unused (pass `u`)."""
    del seed
    x = logits.double()  # (..., V), a copy unless the input is float64 already (then never written)
    if exclude_ids is not None:
        ids = torch.as_tensor(exclude_ids, device=x.device).reshape(-1).long()
        x = x.index_fill(-1, ids, NEG_INF)
    p = torch.softmax(x, dim=-1)
    entropy = torch.special.entr(p).sum(-1)
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top2[..., 0] - top2[..., 1] if top2.shape[-1] > 1 else top2[..., 0]
    if temperature > 0:
        if u is None:
            raise ValueError("token_stats_float64 needs the uniform noise u at temperature > 0")
        token = (x - temperature * torch.log(-torch.log(u.double()))).argmax(-1)
    else:
        token = x.argmax(-1)
    prob = p.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return TokenStats(token, prob, entropy, margin)


StatsFn = Callable[..., TokenStats]
PRECISIONS: dict[str, StatsFn] = {
    # fused kernel on CUDA (Triton), the PyTorch reference elsewhere; float32 arithmetic
    "float32": token_stats,
    # LLaDA's reference precision: exact reproduction of generate.py (fidelity tests), 2x the memory
    "float64": token_stats_float64,
}


# ----------------------------------------------------------------------------- confidence


def _conf_random(s: TokenStats, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(s.prob.shape, generator=generator, device=s.prob.device, dtype=s.prob.dtype)


CONFIDENCES: dict[str, Callable[[TokenStats, torch.Generator | None], torch.Tensor]] = {
    "random": _conf_random,  # LLaDA remasking="random": uniform scores, a random order
    "max_prob": lambda s, g: s.prob,  # Dream maskgit_plus / LLaDA low_confidence: p(token)
    "entropy": lambda s, g: -s.entropy,  # Dream `entropy`: sum p log p (higher = more confident)
    "margin": lambda s, g: s.margin,  # Dream topk_margin: p1 - p2
}


def threshold_in_conf(confidence: str, threshold: float) -> float:
    """A commit threshold in the units of the confidence score the rules compare against: probabilities for
    max_prob / margin / random (commit at conf >= tau, tau in (0, 1]); nats for entropy (commit at entropy
    <= tau, i.e. at -entropy >= -tau)."""
    return -threshold if confidence == "entropy" else threshold


def calibrate(conf: torch.Tensor, strength: float) -> torch.Tensor:
    """Position calibration (cf. PC-Sampler, arXiv 2508.13021): score = conf - strength * d / W, d the offset
    from the block start. strength > 0 favours the block's left end (more AR-like), < 0 its right end."""
    if strength == 0.0:
        return conf
    w = conf.shape[-1]
    d = torch.arange(w, device=conf.device, dtype=conf.dtype) / max(w, 1)
    return conf - strength * d


# ----------------------------------------------------------------------------- count schedules


def llada_counts(masked_now: torch.Tensor, masked_start: torch.Tensor, i: int, s: int, eps: float) -> torch.Tensor:
    """LLaDA `get_num_transfer_tokens` (linear schedule, paper Eq. 8): with M masked at the block start and s
    steps, every step commits M // s, the first M % s steps one more. Tokens remasked since (remasking) are
    added on top, so the block still ends with no masks. (B,) int64."""
    base = masked_start // s
    rem = masked_start % s
    planned_left = masked_start - (base * i + rem.clamp(max=i))
    return base + (rem > i).long() + (masked_now - planned_left).clamp(min=0)


@functools.cache
def _dream_ratio(s: int, eps: float, device: str) -> tuple[torch.Tensor, ...]:
    ts = torch.linspace(1, eps, s + 1, device=device)  # float32, as Dream builds its timesteps
    return tuple(1 - ts[i + 1] / ts[i] for i in range(s))


def dream_counts(masked_now: torch.Tensor, masked_start: torch.Tensor, i: int, s: int, eps: float) -> torch.Tensor:
    """Dream `_sample`: timesteps linspace(1, eps, s + 1); step i unmasks int(n * (1 - t_{i+1} / t_i)) of the
    n positions masked now, all of them on the last step. float32 arithmetic as Dream's. Dream counts the
    batch mean of n; we count per row (the same for one row, or rows with equal counts). (B,) int64."""
    if i == s - 1:
        return masked_now.clone()
    ratio = _dream_ratio(s, float(eps), str(masked_now.device))[i]
    return (masked_now.to(torch.float32) * ratio).long()  # int(): truncation, n * ratio >= 0


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {"llada": llada_counts, "dream": dream_counts}


# ----------------------------------------------------------------------------- commit rules


def ranks_desc(score: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of every entry under a descending sort (0 = best); ties keep column order. (B, W)."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def top_k_mask(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row top-k without a Python loop over rows: (B, W) bool, True at the k[b] best entries of row b."""
    return ranks_desc(score) < k.unsqueeze(-1)


@functools.cache
def dilated_order(w: int, device: str) -> torch.Tensor:
    """(W,) priority of every block offset under the dilated schedule: offsets sorted by their bit-reversed
    index, so consecutive picks are as far apart as the block allows (W=8: 0, 4, 2, 6, 1, 5, 3, 7)."""
    bits = max(1, (w - 1).bit_length())
    rev = [int(format(o, f"0{bits}b")[::-1], 2) for o in range(w)]
    order = sorted(range(w), key=lambda o: rev[o])
    prio = [0] * w
    for r, o in enumerate(order):
        prio[o] = r
    return torch.tensor(prio, device=device)


@dataclass
class CommitInputs:
    """What a commit rule sees at one step (positions of the current block)."""

    score: torch.Tensor  # (B, W) calibrated confidence, -inf where not masked: the ranking
    conf: torch.Tensor  # (B, W) raw confidence, for thresholds
    entropy: torch.Tensor  # (B, W) token entropy, nats
    masked: torch.Tensor  # (B, W) bool, the candidates
    count: torch.Tensor | None  # (B,) tokens to commit, from the schedule (count-based rules only)
    threshold: float  # in the confidence's units (`threshold_in_conf`)
    gamma: float
    factor: float = 1.0  # commit="factor": Fast-dLLM's f
    # what a learned rule reads besides (the sampler fills these; hand-set rules ignore them)
    stats: TokenStats | None = None  # the step's token statistics (token, prob, entropy, margin), (B, W) each
    context: torch.Tensor | None = None  # (B, W + 1) tokens now: the one left of the block, then the block
    step: int = 0  # denoising step inside the block
    block: int = 0  # block index in the span
    span_offset: int | None = None  # where the block starts in the span (None: block * W, the fixed grid)
    num_blocks: int = 1
    stop_ids: torch.Tensor | None = None  # (S,) ids that end an answer
    policy: Callable[[CommitInputs], torch.Tensor] | None = None  # commit="learned": P(final), (B, W)


def commit_static(c: CommitInputs) -> torch.Tensor:
    """LLaDA low-confidence remasking: commit the `count` highest-scoring masked positions."""
    assert c.count is not None
    return top_k_mask(c.score, c.count) & c.masked


def commit_dilated(c: CommitInputs) -> torch.Tensor:
    """Dilated unmasking (DUS, "Plan for Speed: Dilated Scheduling for Masked Diffusion LMs"): commit `count`
    masked positions in the fixed bit-reversed order of `dilated_order`, so the tokens committed together are
    spread across the block and depend on each other as little as possible. Confidence-free by design (like
    DUS); the count per step comes from the schedule."""
    assert c.count is not None
    prio = -dilated_order(c.masked.shape[-1], str(c.masked.device)).to(c.score.dtype)
    return top_k_mask(torch.where(c.masked, prio, NEG_INF), c.count) & c.masked


def commit_threshold(c: CommitInputs) -> torch.Tensor:
    """Fast-dLLM parallel decoding (arXiv 2505.22618): the top-1 masked position always, plus every masked
    position whose confidence is >= threshold."""
    top1 = top_k_mask(c.score, torch.ones_like(c.score[:, 0], dtype=torch.long))
    return (top1 | (c.conf >= c.threshold)) & c.masked


def commit_factor(c: CommitInputs) -> torch.Tensor:
    """Fast-dLLM's factor rule (arXiv 2505.22618, `get_transfer_index_dynamic`): sort the block's masked
    confidences c_1 >= c_2 >= ... and commit the largest prefix n whose every c_k >= 1 - f / (k + 1), i.e.
    (k + 1)(1 - c_k) <= f; the top-1 always. As upstream, when only the last masked position fails, it is
    committed too (the loop's `top_i == len - 1` case), so a block with one mask left after this step never
    waits a pass for it. A higher f commits more per step. Confidences are probabilities (max_prob, margin).

    The ranking is by the calibrated score; with position_calibration = 0 it is the confidence itself."""
    masked_n = c.masked.sum(-1)  # (B,) M per row
    w = c.masked.shape[-1]
    srt = torch.where(c.masked, c.conf, NEG_INF).sort(dim=-1, descending=True, stable=True).values
    n = torch.arange(1, w + 1, device=c.conf.device, dtype=srt.dtype)
    thr = 1 - c.factor / (n + 1)
    thr[0] = -1.0  # at least one token
    ranks = torch.arange(w, device=c.conf.device)
    fail = (srt < thr) & (ranks < masked_n[:, None])
    first_fail = torch.where(fail.any(-1), fail.long().argmax(-1), (masked_n - 1).clamp(min=0))
    count = torch.where((first_fail == 0) | (first_fail == masked_n - 1), first_fail + 1, first_fail)
    count = torch.minimum(count, masked_n)
    return top_k_mask(c.score, count) & c.masked


def commit_entropy_bounded(c: CommitInputs) -> torch.Tensor:
    """EB-sampler (arXiv 2505.24857), simplified: take masked positions in score order while the running sum
    of their entropies stays <= gamma; always at least the first."""
    order = c.score.argsort(dim=-1, descending=True, stable=True)
    ent = torch.where(c.masked, c.entropy, torch.zeros_like(c.entropy)).gather(-1, order)
    keep_sorted = ent.cumsum(-1) <= c.gamma
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep & c.masked


def commit_learned(c: CommitInputs) -> torch.Tensor:
    """Learned parallel decoding (Learn2PD, arXiv 2509.25188; `planners.commit_policy`): the top-1 masked
    position by score always (so a policy that never fires is one-token-per-pass decoding), plus every masked
    position the policy calls final with P(final) >= threshold.

    End of answer: once a stop id is committed in the block (now or earlier), the masked positions right of
    it are committed too — the answer ends at the first stop id, so what fills them cannot change it, and the
    block (and, with `eos_early_stop`, the span) is done without more passes."""
    if c.policy is None:
        raise ValueError("commit='learned' needs a commit policy (SamplerConfig.commit_policy; the sampler loads it)")
    top1 = top_k_mask(c.score, torch.ones_like(c.score[:, 0], dtype=torch.long))
    commit = (top1 | (c.policy(c) >= c.threshold)) & c.masked
    if c.stats is not None and c.context is not None and c.stop_ids is not None:
        tokens = torch.where(commit, c.stats.token, c.context[:, 1:])  # (B, W) the block after this commit
        stop = torch.isin(tokens, c.stop_ids) & (commit | ~c.masked)
        after_stop = (stop.long().cumsum(-1) - stop.long()) > 0  # strictly right of a committed stop id
        commit = commit | (after_stop & c.masked)
    return commit


COMMITS: dict[str, Callable[[CommitInputs], torch.Tensor]] = {
    "static": commit_static,
    "threshold": commit_threshold,
    "factor": commit_factor,
    "dilated": commit_dilated,
    "entropy_bounded": commit_entropy_bounded,
    "learned": commit_learned,
}
COUNTED_COMMITS = frozenset({"static", "dilated"})  # need a count schedule (and LLaDA's divisibility rules)


# ----------------------------------------------------------------------------- remasking


def remask_low_confidence(
    p_now: torch.Tensor, eligible: torch.Tensor, *, threshold: float, max_count: int
) -> torch.Tensor:
    """ReMDM-style remasking (arXiv 2503.00307, confidence variant), bounded: of the eligible committed tokens
    whose probability under the current step's prediction is below `threshold`, send back to mask at most
    `max_count` per row, least likely first. (B, W) bool."""
    cand = eligible & (p_now < threshold)
    score = torch.where(cand, -p_now, NEG_INF)
    k = torch.full_like(score[:, 0], max_count, dtype=torch.long)
    return top_k_mask(score, k) & cand


REMASKS: dict[str, Callable[..., torch.Tensor] | None] = {"none": None, "low_confidence": remask_low_confidence}


# ----------------------------------------------------------------------------- KV-cache windows


@dataclass(frozen=True)
class Window:
    """Which positions a step's forward computes: [start, end) of the sequence."""

    start: int
    end: int


def window_none(*, refresh: bool, lo: int, hi: int, length: int, shift: int, causal: bool, fresh: int) -> Window:
    """No cache: every step is a full forward."""
    return Window(0, length)


def window_prefix(*, refresh: bool, lo: int, hi: int, length: int, shift: int, causal: bool, fresh: int) -> Window:
    """Fast-dLLM prefix cache. Block start (refresh): full attention recomputes everything (its logits make
    the block's first step); causal / block-causal attention recomputes only from `fresh` (the first position
    whose K/V is not final) to the block end, as later positions are invisible to the block. Inside the block:
    x[:, lo - shift:] (full) or x[:, lo - shift:hi] (causal: exact)."""
    if refresh:
        return Window(fresh, hi) if causal else Window(0, length)
    return Window(max(lo - shift, 0), hi if causal else length)


def window_dual(*, refresh: bool, lo: int, hi: int, length: int, shift: int, causal: bool, fresh: int) -> Window:
    """Fast-dLLM dual cache: refresh as the prefix cache, then only x[:, lo - shift:hi] over the whole cache
    (prefix and stale suffix reused until the next block)."""
    if refresh:
        return window_prefix(refresh=True, lo=lo, hi=hi, length=length, shift=shift, causal=causal, fresh=fresh)
    return Window(max(lo - shift, 0), hi)


CACHES: dict[str, Callable[..., Window]] = {"none": window_none, "prefix": window_prefix, "dual": window_dual}

EARLY_STOPS: tuple[str, ...] = ("off", "all", "any", "inside")


def stop_inside(block: torch.Tensor, masked: torch.Tensor, stop_ids: torch.Tensor, before_final: torch.Tensor):
    """End of text inside a block (cf. Learn2PD's end-of-answer stop, arXiv 2509.25188): per row, the positions
    of the block to fill with EOS now — every position right of the first stop id, once that stop id and every
    position before it (in the block, and `before_final` (B,) for the span before the block) are final. Nothing
    left of the stop changes (it was final already); the answer ends at the stop id whatever fills the rest, so
    the block, and the span, need no more passes for it. block, masked: (B, W). (B, W) bool."""
    is_stop = torch.isin(block, stop_ids) & ~masked
    has = is_stop.any(-1)
    first = torch.where(has, is_stop.long().argmax(-1), block.shape[-1])  # (B,)
    cols = torch.arange(block.shape[-1], device=block.device)
    settled = ~(masked & (cols[None, :] < first[:, None])).any(-1)  # nothing masked before the stop
    ok = has & settled & before_final
    return ok[:, None] & (cols[None, :] > first[:, None]) & masked


# ----------------------------------------------------------------------------- logit boosts


def credit_boost(
    preds: torch.Tensor,
    masked: torch.Tensor,
    credit: torch.Tensor | None,
    *,
    alpha: float,
    gamma: float,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dInfer's credit decoding (arXiv 2510.08666, `CreditThresholdParallelDecoder`; after CreditDecoding,
    arXiv 2510.06133): each position of the block keeps a credit per token, decayed by `decay` every step and
    raised by p_top1^gamma for the token it predicts top-1 while still masked; the logits the step decides on
    are logits + alpha * log(1 + credit). A token predicted again and again gathers credit and commits earlier;
    one predicted once decays away. `credit` is None at a block's first step (a fresh (B, W, V) float32 state).
    Returns (boosted logits, credit)."""
    probs = torch.softmax(preds.float(), dim=-1)
    top_p, top_i = probs.max(-1)
    if credit is None:
        credit = torch.zeros(preds.shape, dtype=torch.float32, device=preds.device)
    else:
        credit.mul_(decay)
    credit.scatter_add_(-1, top_i.unsqueeze(-1), (top_p.pow(gamma) * masked.float()).unsqueeze(-1))
    return preds + alpha * torch.log1p(credit).to(preds.dtype), credit


BOOSTS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]] | None] = {"none": None, "credit": credit_boost}


# ----------------------------------------------------------------------------- block boundaries


def block_end_fixed(*, lo: int, default_hi: int, **_: object) -> int:
    """Semi-autoregressive blocks of block_length: the block ends where the fixed grid says."""
    return default_hi


def block_end_adaptive(
    *,
    lo: int,
    default_hi: int,
    limit: int,
    window: int,
    stats: TokenStats,
    masked: torch.Tensor,
    delimiter_ids: torch.Tensor,
    threshold: float,
) -> int:
    """AdaBlock-dLLM (arXiv 2509.26432): at a block's first step, look at the predictions for the next
    `window` positions from lo; if the most confident predicted delimiter (newline, sentence end) has
    probability >= threshold, the block ends right after it, else at default_hi. Never past `limit` (the span's
    end; for block-causal planners, the training block's end: they were trained on that grid, so an adaptive
    block can only split a training block, never span two). A batch shares one block: it ends at the earliest
    row's end, so no row's block crosses its own boundary. stats / masked: the window's (B, window)."""
    hi = min(default_hi, limit)
    width = min(window, limit - lo, stats.token.shape[-1])
    if width <= 0 or delimiter_ids.numel() == 0:
        return hi
    tok, prob = stats.token[:, :width], stats.prob[:, :width]
    is_delim = torch.isin(tok, delimiter_ids) & masked[:, :width]
    score = torch.where(is_delim, prob, NEG_INF)
    best_p, best_at = score.max(-1)  # first of equal maxima (as torch.max)
    ends = torch.where(best_p >= threshold, lo + best_at + 1, torch.full_like(best_at, hi))
    return int(min(int(ends.min()), limit))


BLOCK_RULES: dict[str, Callable[..., int]] = {"fixed": block_end_fixed, "adaptive": block_end_adaptive}
