"""Per-position token statistics for the denoising sampler, fused into one pass over the logits.

For every row of logits (a row = one sequence position; logits shaped (N, V) or (..., V)) this returns
`TokenStats(token, prob, entropy, margin)`:

- token:   argmax of the logits at temperature 0, or the Gumbel-max sample argmax(logits / T + g),
           g = -log(-log u), u ~ U[0, 1), at temperature T > 0 (the same draw as LLaDA's
           exp(logits) / (-log u)^T, taken in the log domain so float32 is enough; LLaDA needs float64
           because it exponentiates first).
- prob:    softmax(logits)[token] under the *untempered* logits (LLaDA's low-confidence remasking score,
           Dream's `maskgit_plus`).
- entropy: -sum p log p of the untempered softmax, in nats (Dream's `entropy` confidence is its negative).
- margin:  p1 - p2, the top-2 probability margin (Dream's `topk_margin`).

Ties (equal logits, or equal perturbed scores) resolve to the lowest token id, as `torch.argmax` does.
`exclude_ids` (e.g. the mask id, which a planner must never predict) are treated as logit -inf everywhere.
A row whose logits are all -inf / excluded has no distribution: its results are unspecified.

Three things live here, as STYLE.md asks of a kernel file: the Triton kernels with their launcher and one
public wrapper (`token_stats_triton`), the pure-PyTorch reference beside them (`token_stats_reference`), and
the dispatch between the two (`token_stats`), chosen once per process from `HYBRID_KERNELS` and the
platform. This module knows nothing about masks, schedules or which positions the sampler will commit: it
turns logits into statistics for every row it is given.

How the kernel reads the logits once (tuned for Hopper from the
compiler's output, not yet timed on a GPU): each program streams a contiguous stretch of one row in tiles of
BLOCK_V columns, 16 bytes per thread per load (LDG.128, evict-first: the logits are read once), three tiles
in flight. Each *lane* (column offset inside the tile) keeps its own online-softmax state across tiles -
running max m, sum of e^(x-m), sum of e^(x-m)(x-m) for the entropy, runner-up for the margin, and the best
perturbed score when sampling - so the loop body has no cross-thread reduction and no barrier, and costs
about 17 instructions and one exp per bf16 logit at temperature 0 (the budget at H100 bandwidth is ~20).
Lanes are merged once at the end. Excluded ids cost nothing in the loop: the lane holding one is recomputed
afterwards from a strided gather of its columns. The merge is associative, so rows are split over several
programs when there are too few rows to fill the GPU (grid = rows x splits) and a tiny second kernel
merges the splits (as flash-decoding's split-K). Sampling adds Philox and two logs per logit and is
compute-bound, roughly 2.5x the greedy path's instructions. All arithmetic is float32.
"""

import functools
import inspect
import math
import os
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAS_TRITON = True
except ImportError:  # triton ships for Linux only; the reference path still works without it
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "TokenStats",
    "backend_for",
    "select_backend",
    "token_stats",
    "token_stats_reference",
    "token_stats_triton",
]

Backend = Literal["triton", "torch"]
SETTINGS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "HYBRID_KERNELS"

# E = -log u is clamped to at least this before its log, so u == 1 (never drawn, but a caller may pass it)
# gives a large finite Gumbel value instead of +inf. Kernel and reference clamp alike.
_TINY = 1e-30


class TokenStats(NamedTuple):
    """Per-row statistics; every field has the logits' leading shape (everything but V)."""

    token: torch.Tensor  # int64: argmax, or the Gumbel-max sample at temperature > 0
    prob: torch.Tensor  # float32: untempered softmax probability of `token`
    entropy: torch.Tensor  # float32: entropy of the untempered softmax, nats
    margin: torch.Tensor  # float32: top-1 minus top-2 untempered probability


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; `None` lets the launcher choose. For tuning (benchmarks) and tests."""

    block_v: int | None = None  # columns per tile, a power of two >= 4
    num_warps: int | None = None
    splits: int | None = None  # programs per row (split-V); the launcher fills the SMs when None


# --------------------------------------------------------------------------------------------------------
# Triton kernels. Literals: -1e30 stands for -inf (finite, so (x - m) * 0 is 0, never NaN); 2147483647 is
# "no column"; 1.4426950408889634 is log2(e) (exp2 is the native instruction).
# NOISE (constexpr): 0 = greedy (temperature 0), 1 = uniform noise read from U, 2 = in-kernel Philox noise.
# A state is the tuple (m, v2, d, t, i1, s, js, xs), see _merge; in the main loop each entry is one value
# per lane, with i1 / js holding the *tile start* of the lane's best column (the lane adds its offset).
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x)  # MUFU.LG2; the accurate log2 is a long software sequence
    else:
        return tl.log2(x)


@triton.jit
def _philox_words(cols, row, rng):
    """Philox4x32-10 (Salmon et al., SC'11) for the quads holding `cols`: counter (col // 4, row, offset)."""
    seed_lo, seed_hi, off_lo, off_hi = rng
    q = (cols // 4).to(tl.uint32)
    zero = q * 0
    seed = (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)
    return tl.philox(seed, q, zero + row.to(tl.uint32), zero + off_lo, zero + off_hi, 10)


@triton.jit
def _uniform_tile(start, row, rng, BLOCK_V: tl.constexpr):
    """(BLOCK_V,) uniforms in [0, 1) for columns start .. start + BLOCK_V (start a multiple of 4).

    One Philox call yields the numbers of four neighbouring columns (word w for column 4q + w), so a tile
    needs BLOCK_V / 4 calls; the same column always gets the same number (see _uniform_at).
    """
    r0, r1, r2, r3 = _philox_words(start + 4 * tl.arange(0, BLOCK_V // 4), row, rng)
    # join stacks on a new last axis: (Q, 2, 2)[q, i, j] = (r0, r2 | r1, r3)[j][i], i.e. word 2i + j.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_V,))
    return tl.uint_to_uniform_float(r)


@triton.jit
def _uniform_at(cols, row, rng):
    """The uniforms _uniform_tile gives these (arbitrary) columns."""
    r0, r1, r2, r3 = _philox_words(cols, row, rng)
    w = cols % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return tl.uint_to_uniform_float(r)


@triton.jit
def _gumbel_score(x, u, scale2, FAST_LOG: tl.constexpr):
    """Gumbel-max score in log2 units: log2(e) (x / T - log(-log u)) + const = x scale2 - log2(-log2 u)."""
    return x * scale2 - _log2(tl.maximum(-_log2(u, FAST_LOG), 1e-30), FAST_LOG)


@triton.jit
def _load_tile(x_row, start, lanes, hi):
    cols = start + lanes
    return tl.load(x_row + cols, mask=cols < hi, other=float("-inf"), eviction_policy="evict_first")


@triton.jit
def _fold(x, start, lanes, hi, state, u_row, row, scale2, rng, NOISE: tl.constexpr, FAST_LOG: tl.constexpr):
    """Fold one tile x (BLOCK_V,) of columns start .. start + BLOCK_V into the per-lane state.

    Tiles must come in increasing column order (the lane keeps the first column reaching its max).
    """
    m, v2, d, t, i1, s, js, xs = state
    x = tl.maximum(x.to(tl.float32), -1e30)  # -inf logits (e.g. vocabulary padding) -> the finite stand-in
    # Online softmax with one exp per element: z = e^(min(x, m) - max(x, m)) rescales the smaller side.
    gt = x > m
    lo_v = tl.minimum(x, m)
    hi_v = tl.maximum(x, m)
    delta = lo_v - hi_v  # <= 0, finite
    z = tl.exp2(delta * 1.4426950408889634)
    t = tl.where(gt, z * (t + delta * d), t + z * delta)  # reads the old d
    d = tl.where(gt, d * z + 1.0, d + z)
    v2 = tl.maximum(v2, lo_v)
    i1 = tl.where(gt, start, i1)
    m = hi_v
    if NOISE > 0:
        if NOISE == 1:
            cols = start + lanes
            u = tl.load(u_row + cols, mask=cols < hi, other=0.5, eviction_policy="evict_first").to(tl.float32)
        else:
            u = _uniform_tile(start, row, rng, x.shape[0])
        score = _gumbel_score(x, u, scale2, FAST_LOG)
        take = score > s
        s = tl.where(take, score, s)
        js = tl.where(take, start, js)
        xs = tl.where(take, x, xs)
    return m, v2, d, t, i1, s, js, xs


@triton.jit
def _stripe_state(x_row, u_row, EX, lane, lo, hi, row, scale2, rng,
                  BLOCK_V: tl.constexpr, STRIPE: tl.constexpr, N_EXCLUDE: tl.constexpr,
                  NOISE: tl.constexpr, FAST_LOG: tl.constexpr):  # fmt: skip
    """Merged state of one lane's columns lo + lane + j BLOCK_V (< hi), with the excluded ids as -inf.

    Excluded ids cost nothing in the streaming loop: it folds them like any column, and afterwards each
    lane holding one is recomputed here from a strided gather of its STRIPE (>= tiles) columns.
    """
    cols = lo + lane + tl.arange(0, STRIPE) * BLOCK_V
    ok = cols < hi
    x = tl.maximum(tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32), -1e30)
    for e in tl.static_range(N_EXCLUDE):
        x = tl.where(cols == tl.load(EX + e).to(tl.int32), -1e30, x)
    s = tl.full([STRIPE], float("-inf"), tl.float32)
    if NOISE > 0:
        if NOISE == 1:
            u = tl.load(u_row + cols, mask=ok, other=0.5).to(tl.float32)
        else:
            u = _uniform_at(cols, row, rng)
        s = _gumbel_score(x, u, scale2, FAST_LOG)
    one = tl.full([STRIPE], 1.0, tl.float32)  # every column is a state of its own: d = 1, t = 0
    return _merge((x, one * -1e30, one, one * 0.0, cols, s, cols, x))


@triton.jit
def _merge(state):
    """Merge states along axis 0 (the lanes of a program, or the splits of a row) into scalars.

    A state: max m, runner-up v2, d = sum e^(x - m), t = sum e^(x - m) (x - m), i1 = first column at m;
    for sampling the best perturbed score s, its column js and its logit xs. States cover disjoint columns,
    so the lowest column among equal maxima is the global first occurrence (torch.argmax's tie rule).
    """
    m, v2, d, t, i1, s, js, xs = state
    mm = tl.max(m, 0)
    ii = tl.min(tl.where(m == mm, i1, 2147483647), 0)
    # Runner-up of the union: every state's runner-up, and every state's max but the winner's.
    vv = tl.maximum(tl.max(v2, 0), tl.max(tl.where(i1 == ii, -1e30, m), 0))
    sc = tl.exp2((m - mm) * 1.4426950408889634)
    dd = tl.sum(d * sc, 0)
    tt = tl.sum(sc * (t + (m - mm) * d), 0)
    ss = tl.max(s, 0)
    jj = tl.min(tl.where(s == ss, js, 2147483647), 0)
    xx = tl.max(tl.where(js == jj, xs, -1e30), 0)
    return mm, vv, dd, tt, ii, ss, jj, xx


@triton.jit
def _store_stats(TOK, PROB, ENT, MARG, row, state, NOISE: tl.constexpr):
    """Write one row's statistics from its merged state."""
    m, v2, d, t, i1, s, js, xs = state
    if NOISE == 0:
        js = i1
        xs = m
    tl.store(TOK + row, js.to(tl.int64))
    tl.store(PROB + row, tl.exp2((xs - m) * 1.4426950408889634) / d)
    tl.store(ENT + row, tl.maximum(tl.log(d) - t / d, 0.0))  # H = log d - sum p (x - m)
    tl.store(MARG + row, (1.0 - tl.exp2((v2 - m) * 1.4426950408889634)) / d)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _token_stats_kernel(
    X,  # (N, V) logits, unit column stride
    stride_x,
    U,  # (N, V) uniform noise, unit column stride (read when NOISE == 1)
    stride_u,
    EX,  # (N_EXCLUDE,) token ids treated as -inf
    TOK,  # (N,) int64      \
    PROB,  # (N,) float32    | outputs, written here when SINGLE_SPLIT
    ENT,  # (N,) float32     |
    MARG,  # (N,) float32   /
    PF,  # (N, splits, 6) float32 partials m, v2, d, t, s, xs   \ written when not SINGLE_SPLIT,
    PI,  # (N, splits, 2) int32 partials i1, js                  / merged by _token_stats_combine_kernel
    V,
    split_cols,  # columns per split, a multiple of 3 * BLOCK_V
    scale2,  # log2(e) / temperature
    seed_lo,  # seed and offset as 31-bit halves (see _split31)
    seed_hi,
    off_lo,
    off_hi,
    BLOCK_V: tl.constexpr,
    STRIPE: tl.constexpr,  # a power of two >= split_cols / BLOCK_V
    N_EXCLUDE: tl.constexpr,
    NOISE: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, V)
    lanes = tl.arange(0, BLOCK_V)
    x_row = X + row.to(tl.int64) * stride_x
    u_row = U + row.to(tl.int64) * stride_u
    rng = (seed_lo, seed_hi, off_lo, off_hi)
    state = (
        tl.full([BLOCK_V], -1e30, tl.float32),  # m
        tl.full([BLOCK_V], -1e30, tl.float32),  # v2
        tl.full([BLOCK_V], 0.0, tl.float32),  # d
        tl.full([BLOCK_V], 0.0, tl.float32),  # t
        tl.full([BLOCK_V], -1, tl.int32),  # i1, as its tile start (-1: none yet)
        tl.full([BLOCK_V], float("-inf"), tl.float32),  # s, log2 units
        tl.full([BLOCK_V], -1, tl.int32),  # js, as its tile start
        tl.full([BLOCK_V], -1e30, tl.float32),  # xs
    )

    # Three tiles in flight: each fold works on a tile loaded two folds earlier, so every warp keeps two
    # 16-byte loads outstanding while it computes (Triton does not software-pipeline loads without a dot).
    # Tiles past `hi` load nothing and fold as -inf, which changes no result.
    xa = _load_tile(x_row, lo, lanes, hi)
    xb = _load_tile(x_row, lo + BLOCK_V, lanes, hi)
    xc = _load_tile(x_row, lo + 2 * BLOCK_V, lanes, hi)
    for start in range(lo, hi, 3 * BLOCK_V):
        state = _fold(xa, start, lanes, hi, state, u_row, row, scale2, rng, NOISE, FAST_LOG)
        xa = _load_tile(x_row, start + 3 * BLOCK_V, lanes, hi)
        state = _fold(xb, start + BLOCK_V, lanes, hi, state, u_row, row, scale2, rng, NOISE, FAST_LOG)
        xb = _load_tile(x_row, start + 4 * BLOCK_V, lanes, hi)
        state = _fold(xc, start + 2 * BLOCK_V, lanes, hi, state, u_row, row, scale2, rng, NOISE, FAST_LOG)
        xc = _load_tile(x_row, start + 5 * BLOCK_V, lanes, hi)

    m, v2, d, t, i1, s, js, xs = state
    i1 = tl.where(i1 >= 0, i1 + lanes, 2147483647)  # tile start -> column
    js = tl.where(js >= 0, js + lanes, 2147483647)
    # Lanes that folded an excluded id: replace their state by a recomputation without it.
    for e in tl.static_range(N_EXCLUDE):
        k = tl.load(EX + e).to(tl.int32)
        valid = (k >= lo) & (k < hi)
        lane = tl.where(valid, k - lo, 0) % BLOCK_V  # non-negative: % truncates on the GPU
        em, ev2, ed, et, ei1, es, ejs, exs = _stripe_state(
            x_row, u_row, EX, lane, lo, tl.where(valid, hi, lo), row, scale2, rng,  # no loads unless valid
            BLOCK_V, STRIPE, N_EXCLUDE, NOISE, FAST_LOG,
        )  # fmt: skip
        here = (lanes == lane) & valid
        m = tl.where(here, em, m)
        v2 = tl.where(here, ev2, v2)
        d = tl.where(here, ed, d)
        t = tl.where(here, et, t)
        i1 = tl.where(here, ei1, i1)
        s = tl.where(here, es, s)
        js = tl.where(here, ejs, js)
        xs = tl.where(here, exs, xs)

    state = _merge((m, v2, d, t, i1, s, js, xs))
    if SINGLE_SPLIT:
        _store_stats(TOK, PROB, ENT, MARG, row, state, NOISE)
    else:
        m, v2, d, t, i1, s, js, xs = state
        p = row.to(tl.int64) * tl.num_programs(1) + split
        tl.store(PF + p * 6 + 0, m)
        tl.store(PF + p * 6 + 1, v2)
        tl.store(PF + p * 6 + 2, d)
        tl.store(PF + p * 6 + 3, t)
        tl.store(PF + p * 6 + 4, s)
        tl.store(PF + p * 6 + 5, xs)
        tl.store(PI + p * 2 + 0, i1)
        tl.store(PI + p * 2 + 1, js)


@triton.jit
def _token_stats_combine_kernel(
    PF,  # (N, splits, 6) float32 partials from _token_stats_kernel
    PI,  # (N, splits, 2) int32 partials
    TOK,
    PROB,
    ENT,
    MARG,
    splits,
    S_PAD: tl.constexpr,  # a power of two >= splits
    NOISE: tl.constexpr,
):
    row = tl.program_id(0)
    k = tl.arange(0, S_PAD)
    ok = k < splits
    p = row.to(tl.int64) * splits + k
    state = (
        tl.load(PF + p * 6 + 0, mask=ok, other=-1e30),  # m
        tl.load(PF + p * 6 + 1, mask=ok, other=-1e30),  # v2
        tl.load(PF + p * 6 + 2, mask=ok, other=0.0),  # d
        tl.load(PF + p * 6 + 3, mask=ok, other=0.0),  # t
        tl.load(PI + p * 2 + 0, mask=ok, other=2147483647),  # i1
        tl.load(PF + p * 6 + 4, mask=ok, other=float("-inf")),  # s
        tl.load(PI + p * 2 + 1, mask=ok, other=2147483647),  # js
        tl.load(PF + p * 6 + 5, mask=ok, other=-1e30),  # xs
    )
    _store_stats(TOK, PROB, ENT, MARG, row, _merge(state), NOISE)


# --------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------

_PROGRAMS_PER_SM = 8  # split rows until rows x splits reaches this many programs per SM ...
_MIN_TILES_PER_SPLIT = 6  # ... but never below this many tiles per program
_MAX_SPLITS = 64


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_INTERPRETER_LOCK = threading.Lock()  # the interpreter's grid state and language patches are process-wide
_REAL_LANG = "__hybrid_triton_language__"  # private-globals keys under which the interpreter finds the real
_REAL_CORE = "__hybrid_triton_language_core__"  # triton.language / .core to patch during a launch


class _LangView(types.ModuleType):
    """A triton.language module as our interpreted copies see it: attributes read through to the real module
    (so the interpreter's patches during a launch are seen), device functions (`tl.max`, `tl.philox`, ...)
    replaced by their interpreted copies."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str):
        return _private(getattr(self._real, name))


class _DeviceCall:
    """A device function (a compiled-mode JITFunction) called from interpreted code: runs its interpreted
    copy. `fn` is that copy too (the interpreter's reduce / scan call `combine_fn.fn`)."""

    def __init__(self, jit_fn) -> None:
        self.jit_fn = jit_fn

    @property
    def fn(self):
        return _rewritten(self.jit_fn.fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_COPIES: dict[int, tuple] = {}  # id(original) -> (original, private copy): the original is kept alive


def _cached(obj, make):
    if id(obj) not in _COPIES:
        _COPIES[id(obj)] = (obj, make())
    return _COPIES[id(obj)][1]


def _private(value):
    """What a name means inside our interpreted copies: device functions and triton.language modules are
    swapped for private views; everything else is itself."""
    from triton.runtime.jit import JITFunction

    if isinstance(value, JITFunction):
        return _cached(value, lambda: _DeviceCall(value))
    if isinstance(value, types.ModuleType) and value.__name__.startswith("triton.language"):
        return _cached(value, lambda: _LangView(value))
    return value


def _private_globals(module_globals: dict) -> dict:
    """A copy of a module's globals for interpreted copies of its functions: names resolve to `_private`
    views, and the real triton.language modules stay visible (under reserved names) for the interpreter to
    patch during a launch. The interpreter writes its own helpers into these copies, never into the modules."""

    def make() -> dict:
        g = {k: _private(v) for k, v in module_globals.items()}
        g[_REAL_LANG], g[_REAL_CORE] = tl, tl.core
        return g

    return _cached(module_globals, make)


def _rewritten(fn):
    """`fn` (a @triton.jit function's Python function) rewritten for the interpreter, with private globals."""
    from triton.runtime.interpreter import FunctionRewriter

    def make():
        copy = types.FunctionType(fn.__code__, _private_globals(fn.__globals__), fn.__name__, fn.__defaults__)
        copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, fn.__annotations__
        return FunctionRewriter(copy).rewrite_ast()

    return _cached(fn, make)


def _run_interpreted(kernel, grid, *args, **kwargs) -> None:
    """Launch `kernel` in the Triton interpreter (CPU tensors), whatever TRITON_INTERPRET was at import.

    Kernels decorated while TRITON_INTERPRET was unset are compiled-mode JITFunctions, as are the device
    functions they call (ours, and triton.language's own: tl.max, tl.philox, ...), and calling one directly
    only raises "outside of the scope of a kernel". So the launch runs an interpreted copy of the kernel whose
    globals are private (`_private_globals`): there, each device function is an interpreted copy with private
    globals of its own, and `tl` is a view of triton.language that does the same. Nothing outside these copies
    changes, except the interpreter's own patches of triton.language for the duration of the launch (as every
    interpreted launch does; restored afterwards, checked by tests/test_kernels.py). Relies on
    triton.runtime.interpreter internals (`FunctionRewriter`, `GridExecutor`).
    """
    from triton.runtime import interpreter

    if isinstance(kernel, interpreter.InterpretedFunction):  # TRITON_INTERPRET=1 was set at import
        kernel[grid](*args, **kwargs)
        return
    with _INTERPRETER_LOCK:
        fn = _rewritten(kernel.fn)
        names = list(inspect.signature(kernel.fn).parameters)
        interpreter.GridExecutor(fn, names, grid)(*args, **kwargs)


def _launch_config(n_rows: int, n_cols: int, elem_size: int, noise: int, device: torch.device, cfg: KernelConfig):
    """(block_v, num_warps, splits, split_cols) for an (n_rows, n_cols) problem.

    A tile gives each thread 16 bytes (8 bf16/fp16, 4 fp32), so every load is one 128-bit access,
    coalesced across the warp; short rows get a tile halved down to their length. 8 warps at temperature
    0 (~80 registers a thread, three programs resident per SM); 4 when sampling, whose Philox and logs
    take ~128 registers. Rows are split over several programs until the grid has `_PROGRAMS_PER_SM`
    programs per SM, keeping at least `_MIN_TILES_PER_SPLIT` tiles (a multiple of 3) per program.
    """
    vec = max(1, 16 // elem_size)
    num_warps = cfg.num_warps or (8 if noise == 0 else 4)
    block_v = cfg.block_v or vec * 32 * num_warps
    if cfg.block_v is None and n_cols < block_v:
        block_v = max(16, triton.next_power_of_2(n_cols))
    if cfg.num_warps is None:
        num_warps = max(1, min(num_warps, block_v // (vec * 32)))
    if block_v < 4 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 4, got {block_v}")
    n_tiles = triton.cdiv(n_cols, block_v)
    if cfg.splits is not None:
        splits = max(1, min(cfg.splits, n_tiles))
    elif device.type == "cuda":
        wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device.index or 0), max(n_rows, 1))
        splits = max(1, min(wanted, n_tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS))
    else:
        splits = 1
    tiles_per_split = 3 * triton.cdiv(n_tiles, 3 * splits)  # the main loop folds three tiles a turn
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return block_v, num_warps, splits, tiles_per_split * block_v


def _split31(value: int) -> tuple[int, int]:
    """A 62-bit integer as (low, high) 31-bit halves: always int32 kernel arguments, one compiled signature."""
    value &= (1 << 62) - 1
    return value & 0x7FFFFFFF, value >> 31


def token_stats_triton(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    u: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    exclude_ids: torch.Tensor | Sequence[int] | None = None,
    config: KernelConfig | None = None,
) -> TokenStats:
    """The fused Triton kernel (interpreted on CPU tensors); same contract as `token_stats`.

    At temperature > 0 the noise is `u` when given (compares exactly with the reference), otherwise
    in-kernel Philox keyed by `seed` and counted by (column, row, `offset`): statistically equivalent to
    the reference's torch.rand noise, not bit-identical. Vary `seed` or `offset` between denoising steps;
    with neither given a seed is drawn from torch's CPU generator. Under CUDA-graph capture the seed and
    offset are baked into the graph (every replay draws the same noise): pass `u` there instead.
    No host syncs: pass `exclude_ids` as a tensor on the logits' device (a Python list is copied over).
    `config` overrides the launcher's tile / warps / splits (tuning and tests).
    """
    x2d, u2d, ex, lead = _prepare(logits, temperature, u, exclude_ids)
    n_rows, n_cols = x2d.shape
    dev = x2d.device
    out = TokenStats(
        torch.empty(n_rows, dtype=torch.int64, device=dev),
        torch.empty(n_rows, dtype=torch.float32, device=dev),
        torch.empty(n_rows, dtype=torch.float32, device=dev),
        torch.empty(n_rows, dtype=torch.float32, device=dev),
    )
    if n_rows:
        _launch(x2d, u2d, ex, temperature, seed, offset, out, config or KernelConfig())
    return TokenStats(*(o.view(lead) for o in out))


def _launch(x2d, u2d, ex, temperature, seed, offset, out: TokenStats, cfg: KernelConfig) -> None:
    n_rows, n_cols = x2d.shape
    dev = x2d.device
    noise = 0 if temperature <= 0 else (1 if u2d is not None else 2)
    block_v, num_warps, splits, split_cols = _launch_config(n_rows, n_cols, x2d.element_size(), noise, dev, cfg)
    if noise == 2 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU generator: no device sync
    seed_lo, seed_hi = _split31(seed or 0)
    off_lo, off_hi = _split31(offset)
    scale2 = math.log2(math.e) / temperature if temperature > 0 else 0.0
    if splits > 1:
        pf = torch.empty((n_rows, splits, 6), dtype=torch.float32, device=dev)
        pi = torch.empty((n_rows, splits, 2), dtype=torch.int32, device=dev)
    else:
        pf, pi = out.prob, out.token  # not read
    u_arg = u2d if u2d is not None else x2d  # not read when there is no noise tensor
    ex_arg = ex if ex is not None else x2d
    main_args = (x2d, x2d.stride(0), u_arg, u_arg.stride(0), ex_arg, *out, pf, pi,
                 n_cols, split_cols, scale2, seed_lo, seed_hi, off_lo, off_hi)  # fmt: skip
    main_meta = dict(BLOCK_V=block_v, STRIPE=triton.next_power_of_2(split_cols // block_v),
                     N_EXCLUDE=0 if ex is None else ex.numel(), NOISE=noise, SINGLE_SPLIT=splits == 1,
                     FAST_LOG=dev.type == "cuda")  # fmt: skip
    combine_args = (pf, pi, *out, splits)
    combine_meta = dict(S_PAD=triton.next_power_of_2(splits), NOISE=noise)
    if dev.type != "cuda":
        _run_interpreted(_token_stats_kernel, (n_rows, splits), *main_args, **main_meta)
        if splits > 1:
            _run_interpreted(_token_stats_combine_kernel, (n_rows,), *combine_args, **combine_meta)
        return
    with torch.cuda.device(dev):
        # num_stages=1: the loop keeps its own tiles in flight, in registers. FMA contraction is pinned on:
        # the instruction budget counts on it (Triton 3.10 turns its default off).
        _token_stats_kernel[(n_rows, splits)](
            *main_args, **main_meta, num_warps=num_warps, num_stages=1, enable_fp_fusion=True
        )
        if splits > 1:
            _token_stats_combine_kernel[(n_rows,)](*combine_args, **combine_meta, num_warps=1, enable_fp_fusion=True)


# --------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the CPU path, and the definition the kernel is tested against.
# --------------------------------------------------------------------------------------------------------


def token_stats_reference(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    u: torch.Tensor | None = None,
    seed: int | None = None,
    exclude_ids: torch.Tensor | Sequence[int] | None = None,
) -> TokenStats:
    """Pure-PyTorch `token_stats`, float32 throughout; materialises softmax (and noise) as (N, V) tensors.

    Without `u` at temperature > 0, noise is torch.rand from a generator seeded with `seed` (the global
    generator when `seed` is None).
    """
    _check(logits, temperature, u)
    x = logits.float()  # (..., V); aliases a float32 input, so never written in place
    if exclude_ids is not None:
        ids = torch.as_tensor(exclude_ids, device=x.device).reshape(-1).long()
        x = x.index_fill(-1, ids, float("-inf"))
    logp = torch.log_softmax(x, dim=-1)  # (..., V)
    p = logp.exp()
    entropy = torch.special.entr(p).sum(-1)  # -sum p log p, with 0 log 0 = 0
    if x.shape[-1] > 1:
        top2 = p.topk(2, dim=-1).values  # (..., 2)
        margin = top2[..., 0] - top2[..., 1]
    else:
        margin = p[..., 0].clone()
    if temperature > 0:
        if u is None:
            gen = torch.Generator(device=x.device)
            gen = gen.manual_seed(seed) if seed is not None else None
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        g = -torch.log((-torch.log(u.float())).clamp_min(_TINY))  # Gumbel(0, 1)
        token = (x / temperature + g).argmax(-1)
    else:
        token = x.argmax(-1)
    prob = p.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return TokenStats(token, prob, entropy, margin)


def _check(logits: torch.Tensor, temperature: float, u: torch.Tensor | None) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if u is not None and u.shape != logits.shape:
        raise ValueError(f"u must have the logits' shape {tuple(logits.shape)}, got {tuple(u.shape)}")


def _prepare(logits, temperature, u, exclude_ids):
    """(x2d, u2d, exclude_ids, lead_shape): (N, V) views with unit column stride (copies only if needed)."""
    _check(logits, temperature, u)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    n_cols = logits.shape[-1]
    lead = logits.shape[:-1]
    x2d = logits.reshape(-1, n_cols)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    u2d = None
    if temperature > 0 and u is not None:
        u2d = u.to(device=x2d.device).reshape(-1, n_cols)
        if u2d.stride(-1) != 1:
            u2d = u2d.contiguous()
    ex = None
    if exclude_ids is not None:
        ex = torch.as_tensor(exclude_ids, device=x2d.device).reshape(-1)
        if ex.numel() == 0:
            ex = None
        elif ex.is_floating_point():
            raise TypeError("exclude_ids must be integer token ids")
    return x2d, u2d, ex, lead


# --------------------------------------------------------------------------------------------------------
# Dispatch: chosen once per process, never re-decided inside the denoising loop.
# --------------------------------------------------------------------------------------------------------


def select_backend(setting: str | None = None, *, device_type: str = "cuda") -> Backend:
    """Which implementation serves tensors on `device_type` under `setting` (default: $HYBRID_KERNELS).

    auto   -> Triton for CUDA tensors when triton is importable, the reference everywhere else;
    triton -> Triton everywhere (on CPU tensors that means the Triton interpreter: slow, for tests);
    torch  -> the reference everywhere.
    """
    if setting is None:
        setting = os.environ.get(ENV_VAR, "auto")
    setting = setting.strip().lower() or "auto"
    if setting not in SETTINGS:
        raise ValueError(f"{ENV_VAR}={setting!r} is not one of {', '.join(SETTINGS)}")
    if setting == "torch":
        return "torch"
    if setting == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton, but triton is not installed")
        return "triton"
    return "triton" if HAS_TRITON and device_type == "cuda" and torch.cuda.is_available() else "torch"


_IMPLS: dict[Backend, Callable[..., TokenStats]] = {
    "triton": token_stats_triton,
    "torch": token_stats_reference,
}


@functools.cache
def _dispatch() -> dict[str, tuple[Backend, Callable[..., TokenStats]]]:
    """Device type -> (backend, implementation), resolved on first use from the environment, then fixed."""
    return {dt: (name, _IMPLS[name]) for dt in ("cuda", "cpu") for name in [select_backend(device_type=dt)]}


_FALLBACK: tuple[Backend, Callable[..., TokenStats]] = ("torch", token_stats_reference)  # other device types


def backend_for(device: torch.device | str) -> Backend:
    """The backend `token_stats` uses for tensors on `device` in this process."""
    return _dispatch().get(torch.device(device).type, _FALLBACK)[0]


def token_stats(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    u: torch.Tensor | None = None,
    seed: int | None = None,
    exclude_ids: torch.Tensor | Sequence[int] | None = None,
) -> TokenStats:
    """Token, confidence, entropy and top-2 margin for every row of `logits`, on the dispatched backend.

    logits:      (N, V) or (..., V), float32 / float16 / bfloat16; read, never written or returned.
    temperature: 0 -> argmax; T > 0 -> Gumbel-max sample argmax(logits / T + g). `prob`, `entropy` and
                 `margin` always describe the untempered softmax.
    u:           optional uniform noise in [0, 1), the logits' shape (any float dtype), used at T > 0; pass
                 it to make the Triton and reference paths draw the same token.
    seed:        seeds the noise when `u` is None (Triton: in-kernel Philox, statistically equivalent to the
                 reference's torch.rand, not bit-identical). Use a different seed per denoising step.
    exclude_ids: token ids treated as -inf (e.g. the mask id), 1-D, ids in [0, V); a tensor on the logits'
                 device keeps the call free of host syncs.
    Returns TokenStats with fields shaped logits.shape[:-1]: token int64; prob, entropy, margin float32.
    Ties resolve to the lowest token id.
    """
    impl = _dispatch().get(logits.device.type, _FALLBACK)[1]
    return impl(logits, temperature=temperature, u=u, seed=seed, exclude_ids=exclude_ids)
