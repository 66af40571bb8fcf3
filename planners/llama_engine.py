"""A llama.cpp engine for block-causal planners: the sampler's forward passes, run by llama.cpp on a GGUF
exported by `planners.export_gguf`.

The sampler (`planners.sampler.denoise`) calls a planner model through one small interface, which the torch
`DiffusionBackbone` and this engine both implement:

    model.config                                     BackboneConfig (mask / stop ids, shift, attention, block size)
    model.device                                     where the sampler keeps its token tensors
    model.new_cache(valid, gen_start=g)              the K/V state of one denoising run over sequences like
                                                     `valid` (B, L) (False = left padding)
    model(ids, attention_mask=, position_ids=,       logits (B, W, V) for the window [cache_start, cache_start + W)
          cache=, cache_start=, final=)              of the sequence; positions before `final` hold final tokens
    model.sparse_logits                              True: the call also takes `outputs` (B, W) bool, the rows the
                                                     caller reads; the others are not computed (zeros)

How this engine makes block-causal attention (causal over the prompt; bidirectional inside a block of the span,
causal across blocks: Fast-dLLM v2, arXiv 2509.26328) exact with llama.cpp's ordinary KV cache:
- the KV cache holds only final tokens. Final positions are decoded once, clean: the prompt with causal attention,
  each final block of the span with non-causal attention over the cache (`llama_set_causal_attn`), so a block
  sees itself and everything before it, never what follows;
- the current (partly masked) block is decoded with non-causal attention, then its cells are removed again
  (`llama_memory_seq_rm`): the next step decodes it afresh with its new tokens;
- a block that has just become final and the next block's first step share one decode (the fold). Every row has
  two sequence ids: its own (r) and a scratch one (S + r). Final cells carry both; the current block's tokens carry
  only the scratch id. llama.cpp masks a query by one of its token's sequence ids, so when that is r for a final
  token, the newly final block sees the cache and itself but not the block after it, and the current block (S + r)
  sees all of them: block-causal attention in one non-causal decode, one pass of the weights instead of two.
  Which of a token's ids the mask reads is llama.cpp's internal choice (the last one in the builds this was
  written for), so the engine checks it once on the loaded model (`fold_order`: the fold's logits against
  two separate decodes) and does not fold if neither order is exact;
- a shifted model's prediction for a block's first position is the previous position's logits, which are final
  once that position is: the engine keeps the last final position's logits and returns them in later windows.
The sampler's prefix cache (`cache="prefix"`, the default for block-causal planners) asks for exactly these
windows; with `cache="none"` there is no cache handle and the engine refuses.

Rows of a batch are llama.cpp sequences (two seq ids per row, as above; padding skipped) in one unified KV cache.
Logits of prompt positions other than the last are not computed (NaN): the sampler reads predictions only for
the span, from `gen_start - 1` on. Given `outputs` (the rows whose predictions the sampler will read: those of
still-masked positions), the engine computes only those rows' logits, and the last final position's (the next
block's shifted prediction); the vocabulary projection is a fifth of a pass for a 135M model.
Each run (`new_cache`) holds its own llama.cpp context, taken from a pool of
idle ones and given back when its cache is dropped, so concurrent runs do not share a KV cache; one run's calls
come from one thread at a time (as the sampler makes them). Model loading goes through
`realizers.llamacpp.model_params` (extra buffer types decided once per machine). Nothing here samples or tokenizes.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planners.export_gguf import read_backbone_config
from planners.model import BackboneConfig

_GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type for the KV cache
DEFAULT_WEIGHTS = "q8_0"  # the export's weight type by default: fastest at the quality gates (benchmarks/README.md)


class _Context:
    """One llama.cpp context (its KV cache, a batch buffer) and the attention mode it is in."""

    def __init__(self, ll, model, *, n_ctx: int, n_seq: int, n_ubatch: int, threads: int, kv: int, fa: bool) -> None:
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_ubatch
        p.n_ubatch = n_ubatch
        p.n_seq_max = 2 * n_seq  # a row's own seq id and its scratch id (the module docstring)
        p.kv_unified = True  # one stream: rows are separated by seq ids; split_simple keeps a block in one ubatch
        p.n_threads = p.n_threads_batch = threads
        p.type_k = p.type_v = kv
        p.no_perf = True
        p.flash_attn_type = 1 if fa else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        self.ll = ll
        self.ctx = ll.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={2 * n_seq})")
        self.shape = (n_ctx, n_seq, n_ubatch)
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_ubatch, 0, 2)
        self.causal: bool | None = None
        self.threads = threads

    @property
    def scratch(self) -> int:
        """Row r's scratch seq id is scratch + r (the module docstring's S)."""
        return self.shape[1]

    def set_threads(self, n: int) -> None:
        if n != self.threads:
            self.ll.llama_set_n_threads(self.ctx, n, n)
            self.threads = n

    def fits(self, n_ctx: int, n_seq: int, n_ubatch: int) -> bool:
        return self.shape[0] >= n_ctx and self.shape[1] >= n_seq and self.shape[2] >= n_ubatch

    def set_causal(self, causal: bool) -> None:
        if self.causal is not causal:
            self.ll.llama_set_causal_attn(self.ctx, causal)
            self.causal = causal

    def free(self) -> None:
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ll.llama_free(self.ctx)
            self.ctx = None


@dataclass
class LlamaCache:
    """The state of one denoising run: the llama.cpp context it holds (back to the engine's pool when the cache
    is garbage) and what that context's KV cache holds."""

    ctx: _Context
    valid: torch.Tensor  # (B, L) bool on the host
    gen_start: int
    final: int = 0  # positions [0, final) of every row are in the KV cache as final tokens
    last_logits: torch.Tensor | None = None  # (B, V) logits at position final - 1

    @property
    def length(self) -> int:
        return self.valid.shape[1]


class LlamaCppEngine:
    """A block-causal planner exported to GGUF, run by llama.cpp (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_threads: int | None = None,
        extra_bufts: str | bool | None = None,
        kv_type: str | None = None,
        config: BackboneConfig | None = None,
        max_ubatch: int = 256,
        flash_attn: bool | None = None,
        verbose: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp._logger import set_verbose

        from realizers.llamacpp import model_params

        set_verbose(verbose)  # llama-cpp-python's process-wide log filter (as `Llama(verbose=...)` sets it)

        self.path = Path(path)
        self.config = config or read_backbone_config(self.path)
        self.weights = self.path.stem.rsplit("-", 1)[-1]  # the weight type, from the export's file name
        c = self.config
        if c.attention not in ("block_causal", "causal"):
            raise ValueError(f"the llama.cpp engine runs block-causal planners; this one has attention={c.attention!r}")
        self._ll = llama_cpp
        params = model_params(self.path, extra_bufts=extra_bufts)
        self.extra_bufts = bool(params.use_extra_bufts)
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        if self.n_vocab != c.vocab_size:
            raise ValueError(f"{self.path}: vocabulary of {self.n_vocab} tokens, config says {c.vocab_size}")
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        if kv_type is None:
            kv_type = "f32" if self.weights == "f32" else "f16"
        self.kv_type = kv_type
        # CPU flash attention computes in f16: off for the f32 export, whose logits match torch's to ~1e-5
        self.flash_attn = (self.weights != "f32") if flash_attn is None else flash_attn
        self.max_ubatch = max_ubatch
        # threads for the next decode, asked before each one (None: n_threads); e.g. every core while nothing else
        # decodes (`hybrid.runtime.share_cores`)
        self.threads_fn: Callable[[], int] | None = None
        self.device = torch.device("cpu")
        self._idle: list[_Context] = []  # contexts of finished runs, reused by the next ones
        self._own_first = False  # a final token's seq ids: (scratch, own); True: (own, scratch)
        self._fold: bool | None = None  # whether folded decodes are exact here (checked on first use)
        self._fold_lock = threading.Lock()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ contexts
    def _take_context(self, n_cells: int, n_seq: int, n_ubatch: int) -> _Context:
        """An idle context with room for the run, else a new one (concurrent runs each hold their own)."""
        n_ctx = max(256, -(-n_cells // 256) * 256)
        with self._lock:
            for i, cx in enumerate(self._idle):
                if cx.fits(n_ctx, n_seq, n_ubatch):
                    return self._idle.pop(i)
        kv = _GGML_TYPES[self.kv_type]
        return _Context(self._ll, self._model, n_ctx=n_ctx, n_seq=n_seq, n_ubatch=n_ubatch, threads=self.n_threads,
                        kv=kv, fa=self.flash_attn)  # fmt: skip

    def _give_back(self, cx: _Context) -> None:
        with self._lock:
            if self._model is None:
                cx.free()
            else:
                self._idle.append(cx)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for cx in idle:
            cx.free()
        if getattr(self, "_model", None):
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def fold_order(self) -> bool:
        """Whether this build's attention mask lets the engine fold (module docstring), checked once: for each
        order of a final token's two seq ids, a final block and the block after it in one decode must give the
        final block's logits of a decode without the later block. Sets the order that is exact."""
        if self._fold is None:
            with self._fold_lock:
                if self._fold is None:
                    self._fold = self._check_fold()
        return self._fold

    def _check_fold(self) -> bool:
        n = 4
        toks = [(i * 7919) % (self.n_vocab - 200) + 100 for i in range(3 * n)]  # arbitrary ordinary tokens
        ids = torch.tensor([toks])
        pos = torch.arange(3 * n)[None]
        valid = torch.ones(1, 3 * n, dtype=torch.bool)
        cx = self._take_context(256, 1, 64)
        try:

            def finals(fold: bool) -> torch.Tensor:
                self._ll.llama_memory_clear(cx.mem, True)
                out = torch.full((1, 3 * n, self.n_vocab), float("nan"))
                rows = _Rows(ids, pos, valid, 0, n, 2 * n, None)
                cx.set_causal(True)
                self._run_rows(cx, rows.tokens(0, n, keep=True), out, 0, split_rows=True)
                cx.set_causal(False)
                if fold:
                    both = rows.join(rows.tokens(n, 2 * n, keep=True), rows.tokens(2 * n, 3 * n, keep=False))
                    self._run_rows(cx, both, out, 0, split_rows=False)
                else:
                    self._run_rows(cx, rows.tokens(n, 2 * n, keep=True), out, 0, split_rows=False)
                return out[0, n : 2 * n]

            want = finals(False)
            tol = 1e-3 * float(want.abs().max()) + 1e-4
            for own_first in (False, True):
                self._own_first = own_first
                if float((finals(True) - want).abs().max()) <= tol:
                    return True
            self._own_first = False
            return False
        finally:
            self._ll.llama_memory_clear(cx.mem, True)
            self._give_back(cx)

    # ------------------------------------------------------------------ the interface
    def new_cache(self, valid: torch.Tensor, *, gen_start: int) -> LlamaCache:
        """Start a denoising run over sequences shaped like `valid` (B, L): clears the KV cache."""
        b, length = valid.shape
        block = self.config.block_size or 1
        # room for a final block and the next one in one decode per row (the fold: module docstring)
        cx = self._take_context(b * length, b, min(self.max_ubatch, max(64, 2 * b * block)))
        self._ll.llama_memory_clear(cx.mem, True)
        cache = LlamaCache(cx, valid.detach().to("cpu", torch.bool), gen_start)
        weakref.finalize(cache, self._give_back, cx)
        return cache

    sparse_logits = True  # __call__ takes `outputs`: only the rows the caller reads are computed

    def __call__(
        self,
        ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LlamaCache | None = None,
        cache_start: int = 0,
        final: int | None = None,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, W, V) float32 for positions [cache_start, cache_start + W); `attention_mask` is implied
        by the layout (block-causal) and not read. Positions before `final` hold final tokens. `outputs` (B, W)
        bool: the rows the caller reads (None: all); the others are zeros (without `outputs`, prompt rows other
        than the last are NaN)."""
        if cache is None:
            raise ValueError(
                "the llama.cpp planner engine needs the sampler's KV cache: use SamplerConfig.cache='prefix'"
            )
        return self._window(ids, position_ids, cache, cache_start, final, outputs)

    # ------------------------------------------------------------------ the work
    def _window(self, ids, position_ids, cache: LlamaCache, a: int, final: int | None, outputs) -> torch.Tensor:
        b_rows, w = ids.shape
        b = a + w
        final = a if final is None else min(max(final, a), b)
        final = max(final, min(cache.final, b))
        if a > cache.final:
            raise ValueError(f"window starts at {a}, but only positions before {cache.final} are in the KV cache")
        if a < cache.final - 1 and a > 0:
            raise ValueError(
                f"window starts at {a}: the engine keeps the logits of the last final position ({cache.final - 1}) "
                "only; windows start at most one position before the first non-final one"
            )
        ids = ids.detach().to("cpu", torch.long)
        if position_ids is None:
            position_ids = torch.arange(a, b).expand(b_rows, w)
        pos = position_ids.detach().to("cpu", torch.long)
        want = None if outputs is None else outputs.detach().to("cpu", torch.bool).expand(b_rows, w)
        valid = cache.valid[:, a:b]
        out = torch.full((b_rows, w, self.n_vocab), float("nan") if want is None else 0.0)
        if a < cache.final and cache.last_logits is not None:
            out[:, cache.final - 1 - a] = cache.last_logits
        g = cache.gen_start
        newly = self._segments(cache.final, final, g) if final > cache.final else []  # become final now
        current = self._segments(final, b, g) if b > final else []  # the current block: decoded, then dropped
        if current and final < g:
            raise NotImplementedError("the llama.cpp engine cannot fill masked positions inside the prompt")
        # the last newly final block and a one-segment current block share a decode (the fold)
        fold = bool(newly) and len(current) == 1 and not newly[-1][2] and not current[0][2] and self.fold_order()
        rows = _Rows(ids, pos, valid, a, g, final, want)
        for u, v, causal in newly[:-1] if fold else newly:
            cache.ctx.set_causal(causal)
            self._run_rows(cache.ctx, rows.tokens(u, v, keep=True), out, a, split_rows=causal)
        if fold:
            (u, v, _), (u2, v2, _) = newly[-1], current[0]
            both = rows.join(rows.tokens(u, v, keep=True), rows.tokens(u2, v2, keep=False))
            cache.ctx.set_causal(False)
            self._run_rows(cache.ctx, both, out, a, split_rows=False)
        else:
            for u, v, causal in current:
                cache.ctx.set_causal(causal)
                self._run_rows(cache.ctx, rows.tokens(u, v, keep=False), out, a, split_rows=causal)
        if final > cache.final:
            cache.final = final
            cache.last_logits = out[:, final - 1 - a].clone()
        if current:
            scratch = cache.ctx.scratch
            for r in range(b_rows):
                self._ll.llama_memory_seq_rm(cache.ctx.mem, scratch + r, int(pos[r, final - a]), -1)
        return out

    def _segments(self, s: int, e: int, gen_start: int) -> list[tuple[int, int, bool]]:
        """[s, e) cut into attention segments: (start, end, causal). The prompt is one causal segment; the span
        is cut at block boundaries, each block non-causal."""
        segs = []
        if s < gen_start:
            segs.append((s, min(e, gen_start), True))
            s = gen_start
        bs = self.config.block_size if self.config.attention == "block_causal" else 1
        while s < e:
            end = min(e, gen_start + ((s - gen_start) // bs + 1) * bs)
            segs.append((s, end, self.config.attention == "causal"))
            s = end
        return segs

    def _run_rows(self, cx: _Context, rows, out, a, *, split_rows: bool) -> None:
        """Pack rows into llama_decode calls of at most n_ubatch tokens (a non-causal segment never splits)."""
        cap = cx.shape[2]
        pending: list[tuple] = []  # (row, t, token, pos, logits?, keep?)
        for r, toks in rows:
            if not split_rows and len(toks) > cap:
                raise ValueError(f"a block of {len(toks)} tokens exceeds the engine's ubatch of {cap}")
            if len(pending) + len(toks) > cap and pending and not split_rows:
                self._flush(cx, pending, out, a)
                pending = []
            for item in toks:
                pending.append((r, *item))
                if split_rows and len(pending) == cap:
                    self._flush(cx, pending, out, a)
                    pending = []
        if pending:
            self._flush(cx, pending, out, a)

    def _flush(self, cx: _Context, items, out, a) -> None:
        ll, batch = self._ll, cx.batch
        cx.set_threads(max(1, int(self.threads_fn())) if self.threads_fn is not None else self.n_threads)
        scratch = cx.scratch
        n = len(items)
        for i, (r, _t, tok, p, lg, keep) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = p
            if keep:  # a final token: both ids, the one its query is masked by (the row's own) where llama.cpp reads it
                batch.n_seq_id[i] = 2
                batch.seq_id[i][0], batch.seq_id[i][1] = (r, scratch + r) if self._own_first else (scratch + r, r)
            else:  # a token of the current block: the scratch id only (removed after the step)
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = scratch + r
            batch.logits[i] = lg
        batch.n_tokens = n
        rc = ll.llama_decode(cx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} ({n} tokens)")
        outs = [(r, t) for r, t, _tok, _p, lg, _k in items if lg]
        if not outs:
            return
        ptr = ll.llama_get_logits(cx.ctx)
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(outs), self.n_vocab))
        logits = torch.from_numpy(arr.copy())
        for k, (r, t) in enumerate(outs):
            out[r, t - a] = logits[k]


@dataclass
class _Rows:
    """One window's tokens, per row, as `_run_rows` takes them: which positions to decode and whose logits."""

    ids: torch.Tensor  # (B, W) on the host
    pos: torch.Tensor  # (B, W)
    valid: torch.Tensor  # (B, W) bool: False = padding, skipped
    a: int  # the window's first position
    gen_start: int
    final: int  # positions before it are final after this call
    want: torch.Tensor | None  # (B, W) bool: rows the caller reads (None: all)

    def tokens(self, u: int, v: int, *, keep: bool) -> list[tuple[int, list[tuple]]]:
        """[(row, [(t, token, pos, logits?, keep?)])] for positions [u, v); keep = a final token (stays cached).
        Logits: the last prompt position; in the span, the rows the caller reads and the last final position."""
        a, rows = self.a, []
        for r in range(self.ids.shape[0]):
            toks = []
            for t in range(u, v):
                if not self.valid[r, t - a]:
                    continue
                if t < self.gen_start:
                    lg = t == self.gen_start - 1
                else:
                    lg = self.want is None or bool(self.want[r, t - a]) or t == self.final - 1
                toks.append((t, int(self.ids[r, t - a]), int(self.pos[r, t - a]), lg, keep))
            if toks:
                rows.append((r, toks))
        return rows

    @staticmethod
    def join(first, second) -> list[tuple[int, list[tuple]]]:
        """Per row, `first`'s tokens then `second`'s (one non-causal decode per row)."""
        merged: dict[int, list[tuple]] = {}
        for r, toks in (*first, *second):
            merged.setdefault(r, []).extend(toks)
        return sorted(merged.items())


def load_engine(
    config,
    sources,
    build_model,
    *,
    weights: str | None = None,
    threads: int | None = None,
    extra_bufts: str | bool | None = None,
    name: str = "planner",
    tokenizer_gguf: str | os.PathLike | None = None,
    progress=lambda _m: None,
) -> LlamaCppEngine:
    """A `LlamaCppEngine` for the torch planner of `config` that `build_model()` loads: exported once to a GGUF
    of `weights` in the cache directory (keyed by `config` and the `sources` files the model is loaded from:
    base weights, adapter), then loaded. On a cache hit `build_model` is not called: no torch weights are read.
    `tokenizer_gguf`: where the tokenizer metadata comes from (default: the packaged SmolLM2 GGUF)."""
    import re

    from planners.assets import smollm2_gguf_path
    from planners.export_gguf import cached_export, source_key

    weights = weights or DEFAULT_WEIGHTS
    key = source_key(*sources, extra=json.dumps(config.to_dict(), sort_keys=True))
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", name.split("(")[0]).strip("_") or "planner"
    path = cached_export(
        build_model,
        key=key,
        weight_type=weights,
        tokenizer_gguf=tokenizer_gguf or smollm2_gguf_path(),
        name=stem,
        progress=progress,
    )
    # the config is the torch model's (what the export was keyed by): no need to parse the GGUF's metadata
    engine = LlamaCppEngine(path, n_threads=threads, extra_bufts=extra_bufts, config=config)
    engine.fold_order()  # the one-time check (~0.2 s) at load, not in the first plan's time
    return engine
