"""Temporal semantic entropy: hand-computed values, extractors, voting, and the real MiniLM clusterer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from planners.trajectory import Trajectory, TrajectoryStep
from planners.tse import (
    TSEConfig,
    cluster_exact,
    cluster_greedy,
    extract_boxed,
    extract_first_line,
    extract_full_text,
    extract_last_number,
    flip_rate,
    get_extractor,
    make_clusterer,
    mean_token_entropy,
    num_skipped,
    score_trajectory,
    step_weights,
    temporal_semantic_entropy,
    temporal_vote,
)

TEA_A = "Boil water, then steep the tea bag for three minutes."
TEA_B = "Steep a tea bag in boiling water for 3 minutes."
BREAD = "Preheat the oven to 200C and bake the bread."


def h2(*ps: float) -> float:
    return -sum(p * math.log2(p) for p in ps if p > 0)


# --------------------------------------------------------------------------------------------- weights


def test_step_weights_schemes():
    assert step_weights(4, "exp", 5.0) == pytest.approx([math.exp(5 * s / 4) for s in (1, 2, 3, 4)])
    assert step_weights(4, "linear") == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert step_weights(3, "uniform") == [1.0, 1.0, 1.0]
    assert step_weights(0, "exp") == []
    with pytest.raises(ValueError, match="exp, linear, uniform"):
        step_weights(3, "cubic")  # type: ignore[arg-type]


def test_num_skipped():
    assert num_skipped(8, 0.5) == 4
    assert num_skipped(5, 0.5) == 2
    assert num_skipped(1, 0.5) == 0
    assert num_skipped(4, 0.0) == 0
    assert num_skipped(4, 0.99) == 3  # always leaves a step
    with pytest.raises(ValueError):
        num_skipped(4, 1.0)


# ------------------------------------------------------------------------------------------ core values


def test_one_cluster_is_zero_bits():
    r = temporal_semantic_entropy(["7", "7.0", "7.00", "7"], skip_ratio=0.0, weights=step_weights(4, "exp", 5))
    assert r.tse_bits == 0.0
    assert len(r.clusters) == 1 and r.probabilities == [1.0]
    assert r.n_used == 4


def test_two_equal_clusters_is_one_bit():
    r = temporal_semantic_entropy(["a", "b", "a", "b"], skip_ratio=0.0)
    assert r.tse_bits == 1.0
    # equal *weight*, unequal count: 2 + 2 = 4
    r = temporal_semantic_entropy(["a", "a", "b"], weights=[2.0, 2.0, 4.0], skip_ratio=0.0)
    assert r.tse_bits == 1.0


def test_weights_move_the_value_as_the_formula_says():
    answers = ["x", "y", "a", "b", "a", "b"]  # T = 6, skip 0.5 -> steps 3..5 (s = 4, 5, 6)
    w = step_weights(6, "exp", 5.0)
    r = temporal_semantic_entropy(answers, weights=w, skip_ratio=0.5)
    wa = math.exp(5 * 4 / 6) + math.exp(5 * 6 / 6)
    wb = math.exp(5 * 5 / 6)
    pa, pb = wa / (wa + wb), wb / (wa + wb)
    assert r.tse_bits == pytest.approx(-(pa * math.log2(pa) + pb * math.log2(pb)), rel=1e-12)
    assert r.probabilities == pytest.approx([pa, pb])
    # uniform weights give the plain count distribution 2/3, 1/3
    ru = temporal_semantic_entropy(answers, skip_ratio=0.5)
    assert ru.tse_bits == pytest.approx(h2(2 / 3, 1 / 3), rel=1e-12)
    # linear: s/T
    rl = temporal_semantic_entropy(answers, weights=step_weights(6, "linear"), skip_ratio=0.5)
    assert rl.tse_bits == pytest.approx(h2(10 / 15, 5 / 15), rel=1e-12)


def test_skipped_steps_are_ignored():
    tail = ["a", "a", "b", "a"]
    base = temporal_semantic_entropy(["q", "r", "s", "t", *tail], weights=step_weights(8, "exp", 5), skip_ratio=0.5)
    other = temporal_semantic_entropy([None, "a", "zz", "b", *tail], weights=step_weights(8, "exp", 5), skip_ratio=0.5)
    assert base.tse_bits == other.tse_bits
    assert base.n_skipped == 4 and base.n_used == 4
    assert base.cluster_ids[:4] == [None] * 4


def test_unparseable_dropped_or_singletons():
    answers = [None, "a", None, "a"]
    dropped = temporal_semantic_entropy(answers, skip_ratio=0.0, drop_unparseable=True)
    assert dropped.tse_bits == 0.0 and dropped.n_used == 2 and dropped.n_unparseable == 2
    kept = temporal_semantic_entropy(answers, skip_ratio=0.0, drop_unparseable=False)
    assert kept.tse_bits == pytest.approx(h2(0.5, 0.25, 0.25))  # {a: 2/4}, {None}: 1/4, {None}: 1/4 -> 1.5 bits
    assert kept.tse_bits == 1.5
    assert [c.representative for c in kept.clusters] == ["a", None, None]


def test_nothing_parsed_is_not_read_as_stable():
    r = temporal_semantic_entropy([None] * 4, skip_ratio=0.0)
    assert r.all_unparseable and r.tse_bits == 2.0  # four singletons, uniform
    assert temporal_vote([None] * 4, skip_ratio=0.0).answer is None
    empty = temporal_semantic_entropy([], skip_ratio=0.5)
    assert empty.tse_bits == 0.0 and empty.n_used == 0


def test_numbers_compare_as_numbers():
    texts = ["so x = 3.0", "The answer is 3", "total: 3.00", "it is 3."]
    answers = [extract_last_number(t) for t in texts]
    assert answers == ["3", "3", "3", "3"]
    assert extract_last_number("we pay $1,000 in total") == extract_last_number("1000") == "1000"
    assert extract_last_number("1,234.50") == "1234.5"
    assert extract_last_number("items 1,2,3") == "3"
    assert extract_last_number("-0.0") == "0"
    assert extract_last_number("no digits here") is None
    assert cluster_exact(["3.0", "3", "03", "3.5", "three"]) == [0, 0, 0, 1, 2]
    assert temporal_semantic_entropy(answers, skip_ratio=0.0).tse_bits == 0.0


def test_other_extractors():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{ 4.0 }") == "4"
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{...} then \boxed{") is None
    assert extract_full_text("  Boil   WATER!!\n then steep.  ") == "boil water! then steep."
    assert extract_full_text(" \n ") is None
    assert extract_first_line("\n\n  Step ONE:  boil\nStep two") == "step one: boil"
    assert get_extractor("boxed") is extract_boxed
    with pytest.raises(ValueError, match="boxed, first_line, full_text, last_number"):
        get_extractor("regex")


def test_exact_clusterer_ignores_punctuation_and_case():
    assert cluster_exact(["Boil water.", "boil  water", "Boil tea"]) == [0, 0, 1]


# -------------------------------------------------------------------------------------------------- vote


def test_vote_weighted_majority_beats_count_majority():
    answers = ["a", "a", "a", "b", "b"]
    w = step_weights(5, "exp", 5.0)  # e^1 .. e^5
    v = temporal_vote(answers, weights=w, skip_ratio=0.0)
    wa, wb = sum(math.exp(k) for k in (1, 2, 3)), sum(math.exp(k) for k in (4, 5))
    assert v.answer == "b" and v.share == pytest.approx(wb / (wa + wb)) and v.step == 4
    assert temporal_vote(answers, skip_ratio=0.0).answer == "a"  # uniform weights: the count majority
    # the representative is the cluster's first member, numbers canonical
    assert temporal_vote(["2", "5.0", "5"], skip_ratio=0.0).answer == "5.0"


def test_vote_never_picks_an_unparseable_singleton():
    v = temporal_vote(["a", None], weights=[1.0, 10.0], skip_ratio=0.0, drop_unparseable=False)
    assert v.answer == "a" and v.share == pytest.approx(1 / 11)


# --------------------------------------------------------------------------------------- companion signals


def test_flip_rate():
    assert flip_rate(["1", "2", "1", "1"], skip_ratio=0.0) == pytest.approx(2 / 3)
    # skip 4 of 8, drop None: 1.0, 2, 2 -> one flip in two transitions
    assert flip_rate(["9", "9", "1", "1", None, "1.0", "2", "2"], skip_ratio=0.5) == pytest.approx(1 / 2)
    assert flip_rate(["1"], skip_ratio=0.0) == 0.0


def _traj(x0: list[list[int]], entropies: list[float | None]) -> Trajectory:
    n = len(x0[0])
    steps = [
        TrajectoryStep(step=i, block=0, committed=[i % n], confidences=[0.9], x0_hat=row, mean_entropy=e)
        for i, (row, e) in enumerate(zip(x0, entropies, strict=True))
    ]
    return Trajectory(prompt_length=3, gen_length=n, mask_id=99, steps=steps, final=x0[-1], nfe=len(x0))


def test_mean_token_entropy():
    t = _traj([[1, 2]] * 4, [2.0, None, 1.0, 0.0])
    assert mean_token_entropy(t) == pytest.approx(1.0)
    assert mean_token_entropy(t, skip_ratio=0.5) == pytest.approx(0.5)
    assert mean_token_entropy(_traj([[1]], [None])) is None


def test_score_trajectory_exact_numbers():
    # token ids are digits, 0 is padding; the steps read 12, 7, 7, 7, 8, 8
    rows = [[1, 2], [7], [7], [7], [8], [8]]
    rows = [r + [0] * (2 - len(r)) for r in rows]  # pad id 0 decodes to nothing
    t = _traj(rows, [1.0, 1.0, 0.5, 0.5, 0.2, 0.2])
    decoded = []

    def decode(ids):
        decoded.append(tuple(ids))
        return "answer: " + "".join(str(i) for i in ids if i)

    cfg = TSEConfig(extractor="last_number", clusterer="exact", alpha=5.0)
    sc = score_trajectory(t, decode, cfg)
    # kept steps 3, 4, 5 (s = 4, 5, 6) read 7, 8, 8
    w7, w8 = math.exp(5 * 4 / 6), math.exp(5 * 5 / 6) + math.exp(5 * 6 / 6)
    assert sc.tse == pytest.approx(h2(w7 / (w7 + w8), w8 / (w7 + w8)), rel=1e-12)
    assert sc.vote == "8" and sc.vote_step == 5 and sc.vote_share == pytest.approx(w8 / (w7 + w8))
    assert sc.flip_rate == pytest.approx(1 / 2)
    assert sc.mean_entropy == pytest.approx(3.4 / 6)
    assert sc.n_clusters == 2 and sc.n_used == 3 and sc.n_steps == 6 and sc.final_answer == "8"
    assert len(decoded) == 3  # identical x0-hat rows decoded once
    json.dumps(sc.to_dict())
    json.dumps(cfg.to_dict())


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="embedding, exact"):
        TSEConfig(clusterer="kmeans")
    with pytest.raises(ValueError, match="boxed, first_line, full_text, last_number"):
        TSEConfig(extractor="json")
    with pytest.raises(ValueError, match="exp, linear, uniform"):
        TSEConfig(weighting="sqrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="skip_ratio"):
        TSEConfig(skip_ratio=1.0)
    with pytest.raises(ValueError, match="threshold"):
        TSEConfig(threshold=1.5)
    with pytest.raises(ValueError, match="embedding, exact"):
        make_clusterer("nope")


def test_greedy_clusterer_compares_with_the_representative_only():
    # unit vectors at 0, 40 and 80 degrees: b is within 0.7 of a and of c, c is not of a -> c opens cluster 1
    vec = {
        k: np.array([math.cos(math.radians(d)), math.sin(math.radians(d))])
        for k, d in zip("abc", (0, 40, 80), strict=True)
    }
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.stack([vec[t] for t in texts])

    assert cluster_greedy(["a", "b", "c", "b", "a"], embed, 0.7) == [0, 0, 1, 0, 0]
    assert calls == [["a", "b", "c"]]  # de-duplicated before embedding
    assert cluster_greedy([], embed, 0.7) == []


# ------------------------------------------------------------------------------------ real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def embedder():
    from planners.embedding import SentenceEmbedder

    return SentenceEmbedder()


def test_minilm_embeddings_are_unit_and_deduplicated(embedder):
    e = embedder([TEA_A, BREAD, TEA_A])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(e[0], e[2])
    assert embedder([]).shape == (0, 384)


def test_minilm_merges_paraphrases_and_separates_plans(embedder):
    # Measured (normalise_text applied, as the full_text extractor does): tea paraphrases 0.964,
    # tea vs bread 0.309 / 0.304. Threshold 0.85 sits between them.
    a, b, c = (extract_full_text(t) for t in (TEA_A, TEA_B, BREAD))
    para, diff1, diff2 = embedder.cosine(a, b), embedder.cosine(a, c), embedder.cosine(b, c)
    assert para == pytest.approx(0.9644, abs=0.01)
    assert diff1 == pytest.approx(0.3091, abs=0.01) and diff2 == pytest.approx(0.3038, abs=0.01)
    cfg = TSEConfig()
    assert diff1 < cfg.threshold < para
    cluster = make_clusterer("embedding", threshold=cfg.threshold, embed=embedder)
    assert cluster([a, b, c, b]) == [0, 0, 1, 0]
    same = temporal_semantic_entropy([a, b, a, b], skip_ratio=0.0, cluster=cluster)
    assert same.tse_bits == 0.0
    split = temporal_semantic_entropy([a, c, b, c], skip_ratio=0.0, cluster=cluster)
    assert split.tse_bits == 1.0


def test_score_trajectory_with_minilm(embedder):
    texts = {1: "Boil", 2: TEA_A, 3: TEA_B, 4: BREAD}
    t = _traj([[1], [4], [2], [3], [2], [3]], [None] * 6)
    sc = score_trajectory(t, lambda ids: texts[ids[0]], TSEConfig(), embed=embedder)
    # after the skip: TEA_B, TEA_A, TEA_B -> one cluster, represented by its first member
    assert sc.tse == 0.0 and sc.n_clusters == 1 and sc.vote == extract_full_text(TEA_B) and sc.vote_step == 5
    assert sc.flip_rate == 0.0 and sc.mean_entropy is None
    json.dumps(sc.to_dict())


def test_model_is_loaded_once_per_process(embedder):
    from planners.embedding import SentenceEmbedder, _load, default_embedder, default_model_dir

    other = SentenceEmbedder(batch_size=1)
    assert _load(other.model_dir, "cpu") is _load(embedder.model_dir, "cpu")
    assert default_embedder() is default_embedder()
    assert default_model_dir().name == "model" and (default_model_dir() / "model.safetensors").is_file()
    # batching and length-sorting do not change the vectors
    texts = [BREAD, TEA_A, "tea", TEA_B]
    assert np.allclose(other(texts), embedder(texts), atol=1e-5)


# ------------------------------------------------------------------------- degenerate drafts and signals


@pytest.mark.parametrize(
    "text",
    [
        "Then, you'll want to add a tea bag or a tea filter. Next a a a",  # a degenerate plan TSE accepted
        "Next a a a tea of tea will be brewed in the pot",
        "tea of tea of tea of the day",
        "You will need a kettle. You will need water, and you will need a cup.",
        "",
        "Okay.",
    ],
)
def test_degenerate_drafts_are_caught(text):
    from planners.tse import degeneracy

    assert degeneracy(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "To make tea, boil water. Pour the water over the tea bag, let it steep for three minutes, then add milk.",
        "The capital of France is Paris.",
        "1. Boil water. 2. Add the tea. 3. Wait. 4. Pour.",
        "Now'll want a a tea tea",  # two in a row is not yet a loop
        "Paris, France.",
    ],
)
def test_fluent_drafts_pass(text):
    from planners.tse import degeneracy

    assert degeneracy(text) is None


def test_final_confidence_and_signal_values():
    from planners.tse import SIGNALS, final_confidence, score_trajectory

    steps = [
        TrajectoryStep(0, 0, [0, 1], [0.9, 0.5], [5, 6, 7, 9], mean_entropy=1.0),
        TrajectoryStep(1, 0, [2, 3], [0.7, 0.99], [5, 6, 7, 9], mean_entropy=0.5),
    ]
    t = Trajectory(prompt_length=3, gen_length=4, mask_id=0, steps=steps, final=[5, 6, 7, 9], nfe=2)
    assert final_confidence(t) == pytest.approx((0.9 + 0.5 + 0.7 + 0.99) / 4)
    assert final_confidence(t, stop_ids=[9]) == pytest.approx((0.9 + 0.5 + 0.7) / 3)  # up to the stop id
    words = {5: "the", 6: "capital", 7: "is", 9: "<eos>"}
    decode = lambda ids: " ".join(words[i] for i in ids if i != 9)  # noqa: E731
    s = score_trajectory(t, decode, TSEConfig(clusterer="exact"), stop_ids=[9])
    sig = s.signals()
    assert set(sig) == set(SIGNALS)
    assert sig["low_confidence"] == pytest.approx(1 - (0.9 + 0.5 + 0.7) / 3)
    assert sig["tse"] == 0.0 and sig["vote_dissent"] == pytest.approx(0.0)
    assert s.degenerate is None and s.value("low_confidence") == pytest.approx(sig["low_confidence"])
    loop = {5: "a", 6: "a", 7: "a", 9: "<eos>"}
    s2 = score_trajectory(t, lambda ids: " ".join(loop[i] for i in ids if i != 9), TSEConfig(clusterer="exact"))
    assert s2.degenerate is not None and s2.value("tse") == math.inf  # never accepted, whatever the signal
    with pytest.raises(ValueError, match="low_confidence"):
        s.value("nope")
