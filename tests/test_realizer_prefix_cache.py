"""Automatic prefix caching in the continuous-batching llama.cpp engine (`realizers.batched`), on the packaged
SmolLM2: a prompt whose prefix comes from the cache (an idle slot of its own, or a copy of another stream, running
or idle) gets exactly the token ids it gets from an empty cache; the cache's accounting and its off switch."""

from __future__ import annotations

import threading

import pytest

from realizers.base import SamplingParams
from tests.test_realizer_embedded import needs_smollm2

SYSTEM = "You are a helpful assistant. Answer briefly and clearly, in plain English."
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?", "Say hi."]
GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def smol(llama_cpp_safe):
    from realizers.embedded import LlamaCppRealizer

    r = LlamaCppRealizer(max_seqs=4, n_ctx=256)
    yield r
    r.close()


def _prompt(r, q: str, system: str = SYSTEM) -> list[int]:
    return r.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": q}])


def _run(engine, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    """The ids sampled for `prompt` and the prompt tokens served from the cache."""
    hits = engine.prefix_hits_tokens
    ids = list(engine.generate(prompt, params))
    return ids, engine.prefix_hits_tokens - hits


def _alone(engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    engine.clear_cache()
    ids, hits = _run(engine, prompt, params)
    assert hits == 0
    return ids


def _together(engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    threads = [
        threading.Thread(target=lambda i=i, p=p: out[i].extend(engine.generate(p, params)))
        for i, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@needs_smollm2
def test_a_cached_prefix_gives_the_ids_of_an_empty_cache(smol):
    """Own-slot reuse: the same prompt again (all but its last token cached), a longer prompt that continues the
    cached prompt and its answer, a shorter one, and one that shares only the system turn (the slot is trimmed)."""
    e = smol.engine
    p = _prompt(smol, QUESTIONS[0])
    first = _alone(e, p)
    again, hits = _run(e, p)
    assert again == first and hits == len(p) - 1

    longer = p + first[:-1] + _prompt(smol, "And of Spain?")[1:]  # the cache holds p and the answer's decoded ids
    ref = _alone(e, longer)
    _alone(e, p)
    got, hits = _run(e, longer)
    assert got == ref and hits == len(p) + len(first) - 1

    shorter = p[:-3]
    ref = _alone(e, shorter)
    _alone(e, p)
    got, hits = _run(e, shorter)
    assert got == ref and hits == len(shorter) - 1

    other = _prompt(smol, QUESTIONS[1])
    shared = next(i for i, (a, b) in enumerate(zip(p, other, strict=False)) if a != b)
    assert shared >= 16
    ref = _alone(e, other)
    _alone(e, p)
    got, hits = _run(e, other)
    assert got == ref and hits == shared
    again, hits = _run(e, p)  # the trimmed slot now holds `other`: only the shared part is reused
    assert again == first and hits == shared
    assert e.kv_usage()["cells"] == 0


@needs_smollm2
def test_a_batch_sharing_a_system_prompt_gives_each_request_its_solo_ids(smol):
    e = smol.engine
    prompts = [_prompt(smol, q) for q in QUESTIONS]
    alone = [_alone(e, p) for p in prompts]
    e.clear_cache()
    assert _together(e, prompts) == alone  # from an empty cache: later prefills may copy earlier ones
    _alone(e, prompts[0])
    hits, copies = e.prefix_hits_tokens, e.prefix_copies
    assert _together(e, prompts) == alone  # one slot holds prompts[0]: the others copy its system turn
    shared = next(i for i, (a, b) in enumerate(zip(*prompts[:2], strict=False)) if a != b)
    assert e.prefix_hits_tokens - hits >= len(prompts[0]) - 1 + 3 * min(shared, 16)
    assert e.prefix_copies - copies >= 1
    assert _together(e, prompts) == alone  # again, every slot now holds a prompt


@needs_smollm2
def test_a_copy_from_a_running_stream_holds_its_cells_before_the_step(smol):
    """A newcomer copies the stream of a request that decodes in the same step (the copy is made before it)."""
    e = smol.engine
    long_p, new_p = _prompt(smol, "Write a story about a fox."), _prompt(smol, QUESTIONS[2])
    long_params = SamplingParams(max_tokens=24)
    long_alone, new_alone = _alone(e, long_p, long_params), _alone(e, new_p)
    e.clear_cache()
    got: list[int] = []
    gen = e.generate(long_p, long_params)
    got.append(next(gen))
    t = threading.Thread(target=lambda: got.extend(gen))
    t.start()
    copies = e.prefix_copies
    new, hits = _run(e, new_p)
    still_running = len(got) < len(long_alone)
    t.join(60)
    assert still_running  # the source decoded in every step of the newcomer's life
    assert new == new_alone and got == long_alone
    assert e.prefix_copies == copies + 1 and hits >= 16


@needs_smollm2
def test_cancelling_keeps_the_others_intact_and_its_cache_exact(smol):
    """A stream left early keeps the cells it decoded: the same prompt then reuses them (its prompt and the ids
    decoded so far) and still gets the ids of an empty cache."""
    e = smol.engine
    doomed_p = _prompt(smol, "Write a story about a fox.")
    prompts = [_prompt(smol, q) for q in QUESTIONS[:3]]
    alone = [_alone(e, p) for p in prompts]
    doomed_alone = _alone(e, doomed_p, SamplingParams(max_tokens=12))
    e.clear_cache()
    out: list[list[int]] = []
    t = threading.Thread(target=lambda: out.extend(_together(e, prompts)))
    t.start()
    gen = e.generate(doomed_p, SamplingParams(max_tokens=400))
    first = [next(gen) for _ in range(4)]
    gen.close()
    t.join(60)
    assert out == alone and first == doomed_alone[:4]
    got, hits = _run(e, doomed_p, SamplingParams(max_tokens=12))
    assert got == doomed_alone and hits == len(doomed_p) - 1  # its slot held the prompt and 4 ids


@needs_smollm2
def test_seeded_sampling_repeats_with_a_cached_prefix(smol):
    e = smol.engine
    p = _prompt(smol, QUESTIONS[2])
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=11, extra={"top_k": 40})
    ref = _alone(e, p, seeded)
    got, hits = _run(e, p, seeded)
    assert got == ref and hits == len(p) - 1


@needs_smollm2
def test_cached_cells_are_reported_apart_and_cleared(smol):
    e = smol.engine
    e.clear_cache()
    prompts = [_prompt(smol, q) for q in QUESTIONS[:2]]
    _together(e, prompts)
    u = e.kv_usage()
    assert u["running"] == 0 and u["cells"] == 0  # no request holds cells
    assert u["cached"] == sum(u["per_seq"].values()) >= max(len(p) for p in prompts)
    assert e.clear_cache() == u["cached"]
    assert e.kv_usage() == {"running": 0, "waiting": 0, "cells": 0, "cached": 0, "per_seq": {}}


@needs_smollm2
def test_the_prefix_cache_can_be_turned_off(llama_cpp_safe):
    from realizers.embedded import LlamaCppRealizer

    r = LlamaCppRealizer(max_seqs=2, n_ctx=128, prefix_cache=False)
    try:
        p = _prompt(r, QUESTIONS[0])
        a, hits_a = _run(r.engine, p)
        b, hits_b = _run(r.engine, p)
        assert a == b and hits_a == hits_b == 0
        assert r.engine.prompt_tokens == 2 * len(p) and r.engine.prefix_copies == 0
        assert r.engine.kv_usage()["per_seq"] == {}
    finally:
        r.close()
