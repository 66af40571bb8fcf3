"""The sentence embedder under concurrent scoring (`planners.embedding.SentenceEmbedder`), with the real
all-MiniLM-L6-v2: calls made together share forward passes instead of queueing behind one lock, each caller gets
exactly its own vectors, and a failure reaches every caller it concerns without hanging the others.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from planners.embedding import SentenceEmbedder

N_CALLERS = 8


def _texts(k: int) -> list[str]:
    """What one request's scoring embeds: a few distinct step texts (others' texts never repeat them)."""
    return [f"Step {i} of plan {k}: boil water, warm the pot, add {k + i} spoons of tea." for i in range(6)]


def _concurrently(embedder: SentenceEmbedder, calls: list[list[str]]) -> list[np.ndarray]:
    start = threading.Barrier(len(calls))

    def one(texts: list[str]) -> np.ndarray:
        start.wait()
        return embedder(texts)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_concurrent_calls_share_forwards_and_get_their_own_vectors():
    calls = [_texts(k) for k in range(N_CALLERS)]
    solo = SentenceEmbedder()
    alone = [solo(texts) for texts in calls]
    assert solo.stats["forwards"] == N_CALLERS  # one forward per call when calls come one at a time

    shared = SentenceEmbedder()
    shared(["warm-up"])  # the model loads outside the timed part
    t0 = time.perf_counter()
    together = _concurrently(shared, calls)
    seconds = time.perf_counter() - t0
    forwards = shared.stats["forwards"] - 1
    print(f"\n{N_CALLERS} concurrent scorings: {forwards} forward passes, {seconds * 1000:.0f} ms")
    assert forwards < N_CALLERS  # at least two calls shared a forward
    assert shared.stats["rows"] - 1 == sum(len(c) for c in calls)  # every text embedded once
    for mine, ref in zip(together, alone, strict=True):
        assert mine.shape == ref.shape == (6, 384)
        np.testing.assert_allclose(mine, ref, atol=1e-5)  # padding in a bigger batch moves nothing that matters


def test_overlapping_calls_embed_each_text_once():
    """Texts two calls share (a trajectory repeats its steps; two requests can share a step) are embedded once."""
    common = ["Boil the water.", "Pour it over the tea."]
    calls = [common + [f"only caller {k}"] for k in range(N_CALLERS)]
    embedder = SentenceEmbedder()
    out = _concurrently(embedder, calls)
    assert embedder.stats["rows"] == len(common) + N_CALLERS
    for vecs in out:
        np.testing.assert_array_equal(vecs[0], out[0][0])
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder([]).shape == (0, 384)


def test_a_failed_forward_reaches_its_callers_and_hangs_nobody(tmp_path):
    broken = SentenceEmbedder(tmp_path / "no-model")  # nothing to load: every forward fails
    errors = []

    def one(k: int) -> None:
        try:
            broken(_texts(k))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 4
    with pytest.raises(OSError):
        broken(["again"])  # nothing was cached, nothing is stuck
