"""Continuous batching over one llama.cpp model: many sequences share each decode step.

One engine thread owns a llama.cpp context whose KV cache is shared by all requests, one sequence id per request
(llama.cpp's batched decode; the scheme of its own server and of vLLM: Kwon et al., arXiv:2309.06180; Orca, Yu et
al., OSDI 2022). Each step builds one `llama_batch`:

1. one token for every sequence that is decoding (the token it sampled last step);
2. prompt tokens of joining sequences, at most `prefill_chunk` per step while other sequences decode (chunked
   prefill, Agrawal et al., arXiv:2403.02369), so a long prompt never stalls the running streams for long;

then one `llama_decode`, then every sequence whose last token carried logits samples its next token with its own
llama.cpp sampler chain (penalties, top-k, top-p, min-p, temperature, seeded draw; greedy at temperature 0) and hands
it to its consumer. A sequence that ends (EOS, `max_tokens`, its context) or is cancelled by its consumer gives its
sequence id back to the pool before the next step; a request waits only for a free sequence id.

Automatic prefix caching (vLLM's "automatic prefix caching"; llama.cpp's server `cache_prompt`): prompts that share
a prefix (the chat template and system turn) skip prefilling it, which matters because prompt processing costs as
much as decoding on a CPU. The engine remembers, for every sequence id, the tokens whose K/V its stream holds. A
sequence that ends keeps its cells (an idle, cached slot). A request takes the free sequence id whose cached tokens
share the longest prefix with its prompt (empty slots, then the least recently used, on a tie), and when its prefill
starts it

1. reuses its own slot's common prefix: `llama_memory_seq_rm(sid, lcp, -1)` drops the rest, or
2. copies the stream of whichever other sequence id, running or idle, shares a longer prefix
   (`llama_memory_seq_cp(src, dst, -1, -1)`: across streams llama.cpp copies the whole stream buffer at the start of
   the next `llama_decode`, before that step writes anything, so a running source gives the cells it held before the
   step; 25 MB at 2048 cells for SmolLM2-135M, ~8 ms measured on 2 cores, where a prompt token costs ~5 ms), when
   that gains at least `_MIN_COPY` tokens, then trims the copy to the prefix;

and prefills only the rest. At most `len(prompt) - 1` tokens are reused: the last prompt token is always decoded,
its logits give the first sampled token. Cells land where they would be alone (position p in cell p of the
sequence's own stream), and each token's K/V depends only on the tokens before it, so the output is the one the
request gets from an empty cache. `kv_usage` reports cells held by running requests apart from cached ones;
`clear_cache` frees the idle slots; `prefix_cache=False` frees a sequence's cells when it ends. Measured with
`benchmarks.bench_server --prefix-cache on,off` (2 cores, 32 clients, ~38-token prompts sharing a 20-token system
turn): TTFT p50 4.7 s -> 1.5 s, 59 -> 78 tokens/s.

Batch-invariant by construction: the KV cache is split into one stream of `n_ctx` cells per sequence id
(`kv_unified = false`) and attention runs llama.cpp's flash-attention kernel, so a request's cells are laid out as
they would be alone and every sampled token at temperature 0 is the one it gets alone (measured: with a unified
cache, where sequences interleave in one cell range, greedy texts diverged after 2-20 tokens in a batch of six).
The price is memory: `max_seqs x n_ctx` cells, allocated at load; the K/V cells are stored as q8_0 (half of f16;
llama.cpp's server offers the same `--cache-type-k/v q8_0`), ~0.9 GB for SmolLM2-135M at 32 x 2048.

Token ids only: no chat template, no text, no stop strings (the consumer's decode loop,
`realizers.embedded._decode`, owns those and closes its token iterator to stop early). The model is loaded through
`realizers.llamacpp`, so llama.cpp's extra buffer types are decided as for every other load.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realizers.base import RealizerError, SamplingParams

_DONE = object()  # end of a sequence's tokens
_MIN_COPY = 16  # copy another stream only for at least this many more prefix tokens than the own slot offers


def _lcp(a: list[int], b: list[int], cap: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `cap`."""
    n = min(len(a), len(b), cap)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class _Seq:
    """One request inside the engine. Written by the engine thread only, except `cancelled`."""

    prompt: list[int]
    params: SamplingParams
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # sampled ids, then _DONE or an exception
    sid: int = -1  # llama.cpp sequence id while the sequence holds cells
    fed: int = 0  # prompt tokens decoded so far
    last: int | None = None  # sampled, not yet decoded
    n_gen: int = 0
    sampler: Any = None  # llama_sampler_p (a chain)
    cancelled: bool = False
    started: bool = False  # its prefill began (the cached prefix, if any, is taken then)


def _sampler_chain(ll: Any, n_vocab: int, params: SamplingParams) -> Any:
    """llama.cpp sampler chain for one request, in llama-cpp-python's order: penalties, then greedy (temperature 0)
    or top-k, top-p, min-p, temperature and a seeded draw. `params.extra` may hold top_k, min_p,
    repetition_penalty (or repeat_penalty), presence_penalty, frequency_penalty; top_k 0 = off."""
    x = params.extra
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = lambda s: ll.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what is added
    repeat = float(x.get("repetition_penalty", x.get("repeat_penalty", 1.0)))
    freq, present = float(x.get("frequency_penalty", 0.0)), float(x.get("presence_penalty", 0.0))
    if repeat != 1.0 or freq or present:
        add(ll.llama_sampler_init_penalties(n_vocab, 64, repeat, freq, present))  # last 64 tokens
    if params.temperature <= 0:
        add(ll.llama_sampler_init_greedy())
        return chain
    top_k = int(x.get("top_k", 0) or 0)
    if top_k > 0:
        add(ll.llama_sampler_init_top_k(top_k))
    if params.top_p < 1.0:
        add(ll.llama_sampler_init_top_p(params.top_p, 1))
    if float(x.get("min_p", 0.0)) > 0:
        add(ll.llama_sampler_init_min_p(float(x["min_p"]), 1))
    add(ll.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    add(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class BatchedEngine:
    """A llama.cpp model serving many token streams at once (see the module docstring).

    `generate(prompt_ids, params)` returns an iterator of sampled ids (the EOS id included, when it comes); close
    it to cancel. It is safe to call from any thread; the engine thread starts with the first request.
    `n_ctx`: the most tokens one sequence may hold (its KV stream); `max_seqs`: sequences decoding at once (more
    wait); `prefill_chunk`: prompt tokens per step while others decode; `prefix_cache`: keep ended sequences' cells
    and reuse shared prompt prefixes (see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        extra_bufts: str | bool | None = None,
        n_ctx: int = 2048,
        max_seqs: int = 32,
        prefill_chunk: int = 128,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        from realizers.llamacpp import model_params

        set_verbose(False)  # llama.cpp's load chatter, as `Llama(verbose=False)` does (a process-wide logger level)
        self._ll = ll
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.max_seqs = max_seqs
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        params = model_params(self.path, extra_bufts)
        self.extra_bufts = bool(params.use_extra_bufts)
        self.model = LlamaModel(path_model=str(self.path), params=params, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * max_seqs  # llama.cpp gives each sequence id n_ctx / n_seq_max cells
        cp.n_batch = cp.n_ubatch = self._batch_cap = max_seqs + prefill_chunk
        cp.n_seq_max = max_seqs
        cp.kv_unified = False  # one stream per sequence: see the module docstring
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.type_k = cp.type_v = ll.GGML_TYPE_Q8_0
        cp.n_threads, cp.n_threads_batch = n_threads, n_threads_batch or n_threads
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model.model, cp)
        if self.ctx is None:
            self.model.close()
            raise RealizerError("llama.cpp could not create a context", where=str(self.path))
        self.mem = ll.llama_get_memory(self.ctx)
        self._batch = ll.llama_batch_init(self._batch_cap, 0, 1)
        self._cv = threading.Condition()  # guards the queues below and `_closed`
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # engine thread only
        self._free_ids = list(range(max_seqs))  # engine thread only; least recently released first
        self._cached: list[list[int]] = [[] for _ in range(max_seqs)]  # per sequence id: the tokens its cells hold
        self._step_lock = threading.Lock()  # held for each step: `kv_usage` reads between steps
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (each one `llama_decode`), for benchmarks and tests
        self.decode_s = 0.0  # seconds spent inside `llama_decode`, for benchmarks (the rest is Python and waiting)
        self.prompt_tokens = 0  # prompt tokens of the requests that started prefilling, for benchmarks
        self.prefix_hits_tokens = 0  # of those, tokens whose K/V came from the cache (not decoded again)
        self.prefix_copies = 0  # stream copies (`llama_memory_seq_cp`) made for a prefix

    # ------------------------------------------------------------------ public

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Sampled token ids for `prompt`, produced as the engine steps; closing the iterator cancels the request."""
        if not prompt:
            raise RealizerError("empty prompt", where=str(self.path))
        if len(prompt) + 1 > self.n_ctx:
            raise RealizerError(f"prompt of {len(prompt)} tokens exceeds the context of {self.n_ctx}")
        p = SamplingParams(
            max(1, min(params.max_tokens, self.n_ctx - len(prompt))),
            params.temperature,
            params.top_p,
            params.stop,
            params.seed,
            dict(params.extra),
        )
        return self._stream(_Seq(list(prompt), p))

    @property
    def eos_id(self) -> int:
        """The model's end-of-sequence id (its vocabulary's EOS; every end-of-generation id ends a stream)."""
        return int(self._ll.llama_vocab_eos(self.vocab))

    @property
    def busy(self) -> bool:
        """Requests are running or waiting (read without the engine's locks: a hint that may be a step old)."""
        return bool(self._running or self._waiting)

    def kv_usage(self) -> dict[str, Any]:
        """Read between steps: sequences running and waiting; the KV cells each llama.cpp sequence id holds
        (`per_seq`: pos max - pos min + 1, from the cache itself); `cells`: those held by running requests;
        `cached`: those held by idle sequence ids for prefix reuse (freed by `clear_cache`)."""
        ll = self._ll
        with self._step_lock:
            per_seq = {}
            for sid in range(self.max_seqs):
                hi = ll.llama_memory_seq_pos_max(self.mem, sid)
                if hi >= 0:
                    per_seq[sid] = hi - ll.llama_memory_seq_pos_min(self.mem, sid) + 1
            with self._cv:
                waiting = len(self._waiting)
            running = len(self._running)
            busy = {s.sid for s in self._running}
        cells = sum(n for sid, n in per_seq.items() if sid in busy)
        cached = sum(n for sid, n in per_seq.items() if sid not in busy)
        return {"running": running, "waiting": waiting, "cells": cells, "cached": cached, "per_seq": per_seq}

    def clear_cache(self) -> int:
        """Free the cells of every idle sequence id (the cached prefixes); returns how many cells were freed.
        Running requests keep theirs."""
        with self._step_lock:
            if self._closed:
                return 0
            freed = 0
            for sid in self._free_ids:
                freed += len(self._cached[sid])
                self._ll.llama_memory_seq_rm(self.mem, sid, -1, -1)
                self._cached[sid] = []
        return freed

    def close(self) -> None:
        """Fail what is still queued or running, stop the engine thread, free the context and the model."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        ll = self._ll
        ll.llama_batch_free(self._batch)
        ll.llama_free(self.ctx)
        self.model.close()

    # ------------------------------------------------------------------ consumer side

    def _stream(self, seq: _Seq) -> Iterator[int]:
        with self._cv:
            if self._closed:
                raise RealizerError("the engine is closed", where=str(self.path))
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llama-batched", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        try:
            while True:
                item = seq.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.cancelled = True  # the engine drops it before its next step (no-op when it already ended)
            with self._cv:
                self._cv.notify_all()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._closed:
                        break
                with self._step_lock:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
        except BaseException as e:  # noqa: BLE001 - every consumer hears about it
            err = e if isinstance(e, RealizerError) else RealizerError(f"engine failed: {type(e).__name__}: {e}")
            for s in list(self._running):
                self._finish(s, err)
        finally:
            with self._cv:
                self._closed = True
                pending, self._waiting = list(self._waiting), deque()
            for s in list(self._running):
                self._finish(s, RealizerError("the engine is closed", where=str(self.path)))
            for s in pending:
                s.out.put(RealizerError("the engine is closed", where=str(self.path)))

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._running if s.cancelled]:
            self._finish(s, None)
        with self._cv:
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        """Waiting requests join, in order, while sequence ids are free (`generate` made each fit its stream)."""
        with self._cv:
            while self._waiting and self._free_ids:
                s = self._waiting.popleft()
                try:
                    s.sampler = _sampler_chain(self._ll, self.n_vocab, s.params)
                except Exception as e:  # noqa: BLE001 - this request's settings, not the engine: tell its consumer
                    s.out.put(RealizerError(f"sampler: {type(e).__name__}: {e}", where=str(self.path)))
                    continue
                s.sid = self._pick_slot(s.prompt)
                self._running.append(s)

    def _pick_slot(self, prompt: list[int]) -> int:
        """The free sequence id whose cached tokens share the longest prefix with `prompt`; on a tie an empty one,
        then the least recently released (the cache keeps the most varied prefixes)."""
        cap = len(prompt) - 1
        best = max(
            range(len(self._free_ids)),
            key=lambda i: (
                _lcp(self._cached[self._free_ids[i]], prompt, cap) if self.prefix_cache else 0,
                not self._cached[self._free_ids[i]],
                -i,
            ),
        )
        return self._free_ids.pop(best)

    def _finish(self, s: _Seq, outcome: BaseException | None) -> None:
        """Free the sequence's id at once, and its cells unless the prefix cache keeps them (not after an error);
        tell the consumer (`None`: normal end or cancelled)."""
        ll = self._ll
        self._running.remove(s)
        if not self.prefix_cache or outcome is not None:
            ll.llama_memory_seq_rm(self.mem, s.sid, -1, -1)
            self._cached[s.sid] = []
        self._free_ids.append(s.sid)
        if s.sampler is not None:
            ll.llama_sampler_free(s.sampler)
            s.sampler = None
        s.out.put(_DONE if outcome is None else outcome)

    def _take_prefix(self, s: _Seq, sources: set[int], targets: set[int]) -> None:
        """Before `s` prefills: keep the prefix its own slot shares with its prompt, or copy a longer one from
        another stream (see the module docstring), drop the other cells, and skip the prefix. `sources`/`targets`:
        the copies queued this step (a stream is never both, so the order llama.cpp applies them in is moot)."""
        ll, sid = self._ll, s.sid
        self.prompt_tokens += len(s.prompt)
        if not self.prefix_cache:
            return
        cap = len(s.prompt) - 1  # the last prompt token is always decoded: its logits give the first token
        own = best = _lcp(self._cached[sid], s.prompt, cap)
        src = -1
        if cap - own >= _MIN_COPY and sid not in sources:
            for other in range(self.max_seqs):
                if other != sid and other not in targets:
                    n = _lcp(self._cached[other], s.prompt, cap)
                    if n >= best + (_MIN_COPY if src < 0 else 1):
                        src, best = other, n
        if src >= 0:
            ll.llama_memory_seq_cp(self.mem, src, sid, -1, -1)  # whole stream, at the next llama_decode
            self._cached[sid] = self._cached[src][:best]
            sources.add(src)
            targets.add(sid)
            self.prefix_copies += 1
        ll.llama_memory_seq_rm(self.mem, sid, best, -1)
        del self._cached[sid][best:]
        s.fed = best
        self.prefix_hits_tokens += best

    def _step(self) -> None:
        """One batch: a token per decoding sequence, then prompt chunks; decode; sample where logits came out."""
        ll, b = self._ll, self._batch
        rows: list[tuple[_Seq, int]] = []  # (sequence, batch index of its logits)
        added: list[tuple[int, int]] = []  # (sequence id, token) in batch order: what the cache holds after it
        sources: set[int] = set()
        targets: set[int] = set()
        n = 0

        def put(tok: int, pos: int, sid: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, logits
            b.seq_id[n][0] = sid
            added.append((sid, tok))
            n += 1

        decoding = [s for s in self._running if s.last is not None]
        for s in decoding:
            put(s.last, len(s.prompt) + s.n_gen - 1, s.sid, True)
            rows.append((s, n - 1))
        budget = self.prefill_chunk if decoding else self._batch_cap  # nothing to stall: prefill at full width
        budget = min(budget, self._batch_cap - n)
        for s in self._running:
            if s.last is not None or budget <= 0:
                continue
            if not s.started:
                s.started = True
                self._take_prefix(s, sources, targets)
            take = min(len(s.prompt) - s.fed, budget)
            for i in range(s.fed, s.fed + take):
                put(s.prompt[i], i, s.sid, i == len(s.prompt) - 1)
            s.fed += take
            budget -= take
            if s.fed == len(s.prompt):
                rows.append((s, n - 1))
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = ll.llama_decode(self.ctx, b)
        self.decode_s += time.perf_counter() - t0
        self.steps += 1
        if rc != 0:
            err = RealizerError(f"llama_decode returned {rc} on a batch of {n} tokens", where=str(self.path))
            for s in {s for s, _ in rows} | {s for s in self._running if s.last is None}:
                self._finish(s, err)
            return
        for sid, tok in added:
            self._cached[sid].append(tok)
        for s, i in rows:
            tok = ll.llama_sampler_sample(s.sampler, self.ctx, i)
            s.n_gen += 1
            s.out.put(tok)
            end = (
                ll.llama_vocab_is_eog(self.vocab, tok)
                or s.n_gen >= s.params.max_tokens
                or len(s.prompt) + s.n_gen >= self.n_ctx
            )
            if end or s.cancelled:
                self._finish(s, None)
            else:
                s.last = tok
