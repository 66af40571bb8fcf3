"""`realizer.weights`: the packaged SmolLM2 (a Q4_1 GGUF) run at another weight type, converted once by llama.cpp's
own quantiser into the cache directory. Real model, no mocks: the conversion itself (cached, atomic, announced),
what it costs in fidelity (next-token distributions against the shipped file, teacher-forced), that continuous
batching stays exact on the converted weights, and that a bad value is a configuration error."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from test_realizer_embedded import needs_smollm2  # the packaged GGUF and llama-cpp-python are installed

from hybrid.config import ConfigError, HybridConfig
from realizers.base import SamplingParams, acomplete
from realizers.embedded import DEFAULT_WEIGHTS, packaged_gguf_path, resolve_weights
from realizers.gguf_weights import gguf_file_type

QUESTIONS = [
    "How do I make a cup of tea?",
    "Explain how a bicycle works.",
    "Why is the sky blue?",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "What should I pack for a weekend hike?",
]


def _msgs(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


# ----------------------------------------------------------------------------- the setting


def test_bad_weights_value_is_a_config_error_naming_the_field_and_choices(monkeypatch):
    with pytest.raises(ConfigError) as e:
        HybridConfig.load(**{"realizer.weights": "q5_k_m"})
    msg = str(e.value)
    assert "realizer.weights" in msg and "q5_k_m" in msg
    assert all(f"'{w}'" in msg for w in ("auto", "q4_1", "q8_0", "q4_0")), msg
    monkeypatch.setenv("HYBRID_REALIZER__WEIGHTS", "int8")
    with pytest.raises(ConfigError, match="realizer.weights"):
        HybridConfig.load()
    monkeypatch.delenv("HYBRID_REALIZER__WEIGHTS")
    assert HybridConfig.load().realizer.weights == "auto"
    assert HybridConfig.load(**{"realizer.weights": "q4_0", "realizer.threads": 1}).realizer.threads == 1
    with pytest.raises(ConfigError, match="realizer.threads"):
        HybridConfig.load(**{"realizer.threads": 0})


def test_auto_means_the_measured_type_for_the_packaged_file_and_as_is_for_your_own():
    assert resolve_weights("auto", packaged=True) == DEFAULT_WEIGHTS == "q8_0"
    assert resolve_weights("auto", packaged=False) == "as_is"
    assert resolve_weights("q4_0", packaged=False) == "q4_0"
    with pytest.raises(ValueError, match=r"realizer.weights='fp8' is not valid; choose one of: auto, q4_1, q8_0, q4_0"):
        resolve_weights("fp8", packaged=True)


@needs_smollm2
def test_file_type_comes_from_the_header():
    t0 = time.perf_counter()
    assert gguf_file_type(packaged_gguf_path()) == "q4_1"
    assert time.perf_counter() - t0 < 1.0  # header only: no tensor is read


# ----------------------------------------------------------------------------- the conversion


@needs_smollm2
def test_conversion_runs_once_atomically_and_says_so(tmp_path, monkeypatch):
    from realizers.llamacpp import weights_file

    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path))
    src = packaged_gguf_path()
    said: list[str] = []
    path = weights_file(src, "q4_0", progress=said.append)  # the cheapest conversion (~1 s on one core)
    assert path.parent == tmp_path / "realizer-gguf" and path.name.endswith("-q4_0.gguf")
    assert gguf_file_type(path) == "q4_0"
    assert len(said) == 2, said
    assert "q4_1 -> q4_0" in said[0] and "once" in said[0] and str(tmp_path) in said[0]
    assert said[1].startswith("converted ") and " s (" in said[1]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    again: list[str] = []
    assert weights_file(src, "q4_0", progress=again.append) == path and again == []  # cached: no second conversion
    assert weights_file(src, "q4_1", progress=again.append) == src and again == []  # the shipped type: the file itself


@needs_smollm2
def test_a_failed_conversion_is_a_setup_error_saying_what_to_do(tmp_path, monkeypatch):
    from hybrid.runtime import SetupError, build_realizer

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(blocker))  # the cache directory cannot be created
    cfg = HybridConfig.load(**{"mode": "ar", "realizer.weights": "q4_0", "realizer.max_seqs": 1})
    with pytest.raises(SetupError) as e:
        build_realizer(cfg)
    msg = str(e.value)
    assert msg.startswith("realizer: could not convert SmolLM2-135M-Instruct.Q4_1.gguf (q4_1) to q4_0"), msg
    assert "realizer.weights to q4_1" in msg


# ----------------------------------------------------------------------------- fidelity


def _logprobs(path, seqs: list[tuple[int, list[int]]]) -> list[np.ndarray]:
    """Next-token log-probabilities at the answer positions of each (prompt length, ids), teacher-forced."""
    from realizers.llamacpp import load_llama

    llm = load_llama(path, n_ctx=256, n_batch=256, logits_all=True, n_threads=1, n_threads_batch=1)
    out = []
    for plen, seq in seqs:
        llm.reset()
        llm.eval(seq)
        x = np.asarray(llm.scores[plen - 1 : len(seq) - 1], dtype=np.float64)
        x -= x.max(-1, keepdims=True)
        out.append(x - np.log(np.exp(x).sum(-1, keepdims=True)))
    del llm
    return out


@needs_smollm2
async def test_converted_weights_against_the_shipped_file(llama_cpp_safe):
    """Teacher-forced on the shipped file's own greedy answers: q8_0 (the default) keeps its next-token
    distributions (measured on 80 factual answers: mean KL 0.006 nats, top token the same at 96% of positions,
    accuracy 61% against 62%); q4_0 requantised from Q4_1 does not (KL 0.37, 73%), which is why it is opt-in.
    Greedy texts are not compared token for token: near-ties flip between any two weight files, q8_0 included."""
    from realizers.embedded import LlamaCppRealizer

    ref = LlamaCppRealizer(weights="q4_1", max_seqs=4, n_ctx=256)
    try:
        cs = await asyncio.gather(*(acomplete(ref, _msgs(q), SamplingParams(max_tokens=24)) for q in QUESTIONS[:4]))
        seqs = []
        for q, c in zip(QUESTIONS, cs, strict=False):
            p = ref.prompt_ids(_msgs(q))
            seqs.append((len(p), p + ref.engine.model.tokenize(c.text.encode(), add_bos=False, special=False)))
    finally:
        ref.close()
    base = _logprobs(ref.path, seqs)
    tokens = np.concatenate([s[plen:] for plen, s in seqs])
    stats = {}
    for w in ("q8_0", "q4_0"):
        r = LlamaCppRealizer(weights=w, max_seqs=1, n_ctx=256)
        r.close()
        assert r.weights == w and r.path != ref.path
        lp = np.concatenate(_logprobs(r.path, seqs))
        b = np.concatenate(base)
        stats[w] = dict(
            kl=float((np.exp(b) * (b - lp)).sum(-1).mean()),
            top1=float((b.argmax(-1) == lp.argmax(-1)).mean()),
            nll=float(-lp[np.arange(len(lp)), tokens].mean()),
        )
    ref_nll = float(-np.concatenate(base)[np.arange(len(tokens)), tokens].mean())
    assert stats["q8_0"]["kl"] < 0.03 and stats["q8_0"]["top1"] >= 0.9, stats
    assert stats["q8_0"]["nll"] < ref_nll + 0.05, (stats, ref_nll)
    assert stats["q4_0"]["kl"] > 5 * stats["q8_0"]["kl"], stats  # the loss the README documents


# ----------------------------------------------------------------------------- batching stays exact


@needs_smollm2
@pytest.mark.parametrize("weights", ["q4_1", "q4_0"])  # q8_0, the default, runs in tests/test_realizer_embedded.py
async def test_a_batch_gives_each_request_its_solo_text(llama_cpp_safe, weights):
    from realizers.embedded import LlamaCppRealizer

    r = LlamaCppRealizer(weights=weights, max_seqs=6, n_ctx=256)
    try:
        assert r.weights == weights
        params = SamplingParams(max_tokens=24)
        alone = [await acomplete(r, _msgs(q), params) for q in QUESTIONS]
        together = await asyncio.gather(*(acomplete(r, _msgs(q), params) for q in QUESTIONS))
        assert [c.text for c in together] == [c.text for c in alone]
    finally:
        r.close()


@needs_smollm2
def test_build_realizer_passes_weights_and_threads(llama_cpp_safe):
    import llama_cpp

    from hybrid.runtime import build_realizer

    said: list[str] = []
    cfg = HybridConfig.load(**{"mode": "ar", "realizer.weights": "q4_1", "realizer.threads": 1, "realizer.max_seqs": 2})
    r = build_realizer(cfg, said.append)
    try:
        assert r.weights == "q4_1" and r.path == packaged_gguf_path()
        assert llama_cpp.llama_n_threads(r.engine.ctx) == 1 and llama_cpp.llama_n_threads_batch(r.engine.ctx) == 1
        assert any("weights q4_1" in m for m in said), said
    finally:
        r.close()
