"""Temporal semantic entropy (TSE) and temporal self-consistency voting over a denoising trajectory.

"Time Is a Feature" (arXiv 2508.09138): a masked-diffusion model's intermediate clean-sequence estimates
x0-hat_s carry signal. Extract an answer from every step's x0-hat, drop the first ``skip_ratio * T``
steps, weight the rest by w(s), cluster equivalent answers and measure

    p(C) = sum_{s in C} w(s) / sum_s w(s),    TSE = -sum_C p(C) log2 p(C)    (bits)

Low TSE = the estimate settled early and stayed put; high TSE = it oscillated. The vote
a* = argmax_C sum_{s in C} w(s) reuses the same clusters and costs no forward pass.

Pure functions over lists of strings. No model and no tokenizer here: text comes from a ``decode``
callable the caller passes, embeddings (for the ``"embedding"`` clusterer) from ``planners.embedding``,
imported only when that clusterer is built.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from planners.trajectory import Trajectory

Weighting = Literal["exp", "linear", "uniform"]
Extractor = Callable[[str], "str | None"]
Clusterer = Callable[[Sequence[str]], list[int]]  # answers (all parseable) -> cluster id per answer, ids 0..K-1
EmbedFn = Callable[[Sequence[str]], Any]  # texts -> (N, D) L2-normalised array

# ----------------------------------------------------------------------------------------------- weights


def _w_exp(s: int, T: int, alpha: float) -> float:
    return math.exp(alpha * s / T)


def _w_linear(s: int, T: int, alpha: float) -> float:
    return s / T


def _w_uniform(s: int, T: int, alpha: float) -> float:
    return 1.0


WEIGHTINGS: dict[str, Callable[[int, int, float], float]] = {
    "exp": _w_exp,
    "linear": _w_linear,
    "uniform": _w_uniform,
}


def step_weights(num_steps: int, scheme: Weighting = "exp", alpha: float = 5.0) -> list[float]:
    """w(s) for steps s = 1..T (1-based: the last step has s = T). exp: exp(alpha*s/T); linear: s/T; uniform: 1.

    Later steps weigh more (paper, Sec. 3: later estimates are closer to the final answer). Index i of the
    returned list belongs to trajectory step i (0-based), i.e. s = i + 1.
    """
    fn = _lookup(WEIGHTINGS, scheme, "weighting")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    return [fn(i + 1, num_steps, alpha) for i in range(num_steps)]


def num_skipped(num_steps: int, skip_ratio: float) -> int:
    """How many leading steps the skip drops: floor(skip_ratio * T). Always leaves at least one step when T > 0."""
    _check_skip(skip_ratio)
    return min(int(math.floor(skip_ratio * num_steps + 1e-9)), max(num_steps - 1, 0))


# ------------------------------------------------------------------------------------------- extractors

# thousands separators only in groups of three ("1,234.5"), so a list "1,2,3" reads as three numbers
_NUM_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_PUNCT_RUN_RE = re.compile(r"([^\w\s])\1+")


def canonical_number(text: str) -> str | None:
    """'3.00' -> '3', '1,234.50' -> '1234.5', '-0' -> '0'; None if ``text`` is not a single number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip("%").strip()
    if not t or not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == 0:
        return "0"
    s = format(d.normalize(), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def extract_last_number(text: str) -> str | None:
    """Last number in the text, canonicalised so that '3.0', '3' and '3.00' compare equal (commas dropped)."""
    for m in reversed(_NUM_RE.findall(text)):
        n = canonical_number(m)
        if n is not None:
            return n
    return None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} (nested braces balanced), in order."""
    out, i = [], 0
    while (j := text.find("\\boxed", i)) != -1:
        k = j + len("\\boxed")
        while k < len(text) and text[k] == " ":
            k += 1
        if k >= len(text) or text[k] != "{":
            i = k
            continue
        depth, start = 0, k + 1
        for e in range(k, len(text)):
            depth += {"{": 1, "}": -1}.get(text[e], 0)
            if depth == 0:
                out.append(text[start:e])
                i = e + 1
                break
        else:  # unbalanced: the estimate is still half-masked
            break
    return out


def extract_boxed(text: str) -> str | None:
    """Last non-empty \\boxed{...}; numbers canonicalised, other contents with spaces removed."""
    for c in reversed(_boxed_contents(text)):
        c = c.strip()
        if c and not re.fullmatch(r"\.+", c):
            n = canonical_number(c)
            return n if n is not None else re.sub(r"\s+", "", c)
    return None


def normalise_text(text: str) -> str:
    """NFKC, casefold, collapse whitespace and repeated punctuation ('!!' -> '!').

    Punctuation itself is kept: all-MiniLM-L6-v2 is sensitive to it (measured: cosine of two tea-making
    paraphrases 0.96 with their full stops, 0.86 without). The ``exact`` clusterer strips it for its key.
    """
    t = unicodedata.normalize("NFKC", text).casefold()
    t = _PUNCT_RUN_RE.sub(r"\1", t)
    return " ".join(t.split())


def extract_full_text(text: str) -> str | None:
    """The whole estimate, normalised (for free-text plans). None if nothing but whitespace."""
    t = normalise_text(text)
    return t or None


def extract_first_line(text: str) -> str | None:
    """First non-empty line, normalised."""
    for line in text.splitlines():
        if t := normalise_text(line):
            return t
    return None


EXTRACTORS: dict[str, Extractor] = {
    "last_number": extract_last_number,
    "boxed": extract_boxed,
    "full_text": extract_full_text,
    "first_line": extract_first_line,
}


def get_extractor(name: str) -> Extractor:
    return _lookup(EXTRACTORS, name, "extractor")


# ------------------------------------------------------------------------------------------- clusterers


def exact_key(answer: str) -> str:
    """Equivalence key of the exact clusterer: the number if the answer is one, else text without punctuation."""
    n = canonical_number(answer)
    if n is not None:
        return n
    t = unicodedata.normalize("NFKC", answer).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", t).split())


def cluster_exact(answers: Sequence[str]) -> list[int]:
    """Cluster by exact match of ``exact_key`` (the paper's rule: parsed answers, numbers as numbers)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(exact_key(a), len(ids)) for a in answers]


def cluster_greedy(answers: Sequence[str], embed: EmbedFn, threshold: float) -> list[int]:
    """Greedy semantic clustering: in order, join the first cluster whose representative (its first member)
    has cosine >= threshold with the answer, else open a new cluster. ``embed`` returns L2-normalised rows.
    """
    if not answers:
        return []
    uniq = list(dict.fromkeys(answers))
    vecs = embed(uniq)  # (U, D), unit rows
    row = {a: i for i, a in enumerate(uniq)}
    reps: list[int] = []  # row index of each cluster's representative
    memo: dict[str, int] = {}
    out = []
    for a in answers:
        if a not in memo:
            v = vecs[row[a]]
            cid = next((c for c, r in enumerate(reps) if float(vecs[r] @ v) >= threshold), None)
            if cid is None:
                cid = len(reps)
                reps.append(row[a])
            memo[a] = cid
        out.append(memo[a])
    return out


def _make_exact(threshold: float, embed: EmbedFn | None) -> Clusterer:
    return cluster_exact


def _make_embedding(threshold: float, embed: EmbedFn | None) -> Clusterer:
    if embed is None:
        from planners.embedding import default_embedder

        embed = default_embedder()
    return lambda answers: cluster_greedy(answers, embed, threshold)


CLUSTERERS: dict[str, Callable[[float, EmbedFn | None], Clusterer]] = {
    "exact": _make_exact,
    "embedding": _make_embedding,
}


def make_clusterer(name: str, *, threshold: float = 0.85, embed: EmbedFn | None = None) -> Clusterer:
    """Build a registered clusterer. ``embed`` defaults to the process-wide all-MiniLM-L6-v2 (loaded lazily)."""
    return _lookup(CLUSTERERS, name, "clusterer")(threshold, embed)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ClusterInfo:
    id: int
    representative: str | None  # first member in time order (None: an unparseable step kept as its own cluster)
    steps: list[int]  # trajectory step indices (0-based) in this cluster
    weight: float  # sum of w(s) over its steps
    probability: float  # weight / total weight


@dataclass
class TSEResult:
    tse_bits: float
    clusters: list[ClusterInfo]
    probabilities: list[float]  # per cluster, same order as ``clusters``
    n_used: int  # steps that entered the distribution
    n_steps: int  # T
    n_skipped: int  # leading steps dropped by skip_ratio
    n_unparseable: int  # steps after the skip whose extractor returned None
    cluster_ids: list[int | None]  # per step: its cluster, None if skipped or dropped
    all_unparseable: bool = False  # no step parsed: scored as if each unparseable step were its own cluster

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VoteResult:
    answer: str | None  # representative of the heaviest parseable cluster (None if nothing parsed)
    share: float  # its weight / total weight
    cluster: int | None
    step: int | None  # latest step of the winning cluster: take the full x0-hat / text from there

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- core


def temporal_semantic_entropy(
    answers: Sequence[str | None],
    *,
    weights: Sequence[float] | None = None,
    skip_ratio: float = 0.5,
    cluster: Clusterer | str = "exact",
    drop_unparseable: bool = True,
) -> TSEResult:
    """TSE in bits over per-step answers (index = trajectory step; None = unparseable).

    weights: w per step, same length as ``answers`` (see ``step_weights``); None = uniform.
    drop_unparseable: drop None steps (True) or give each its own singleton cluster (False).
    If no step after the skip parses, the result falls back to singletons (``all_unparseable``), so
    "nothing parsed" never reads as "perfectly stable" (0 bits) unless only one step is left.
    """
    T = len(answers)
    w = [1.0] * T if weights is None else [float(x) for x in weights]
    if len(w) != T:
        raise ValueError(f"weights has {len(w)} entries for {T} answers")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError("weights must be finite and >= 0")
    clusterer = make_clusterer(cluster) if isinstance(cluster, str) else cluster

    skip = num_skipped(T, skip_ratio)
    kept = list(range(skip, T))
    parsed = [i for i in kept if answers[i] is not None]
    n_unparseable = len(kept) - len(parsed)
    all_unparseable = bool(kept) and not parsed
    singletons = [] if (drop_unparseable and not all_unparseable) else [i for i in kept if answers[i] is None]

    ids = clusterer([answers[i] for i in parsed]) if parsed else []  # type: ignore[misc]
    cluster_ids: list[int | None] = [None] * T
    for i, c in zip(parsed, ids, strict=True):
        cluster_ids[i] = c
    k = max(ids, default=-1) + 1
    for j, i in enumerate(singletons):
        cluster_ids[i] = k + j

    members: dict[int, list[int]] = {}
    for i in kept:
        if cluster_ids[i] is not None:
            members.setdefault(cluster_ids[i], []).append(i)
    total = sum(w[i] for m in members.values() for i in m)
    clusters = []
    for cid in sorted(members):
        steps = members[cid]
        wt = sum(w[i] for i in steps)
        clusters.append(ClusterInfo(cid, answers[steps[0]], steps, wt, wt / total if total > 0 else 0.0))
    probs = [c.probability for c in clusters]
    tse = -sum(p * math.log2(p) for p in probs if p > 0)
    return TSEResult(
        tse_bits=max(tse, 0.0) + 0.0,  # + 0.0: no -0.0 in JSON
        clusters=clusters,
        probabilities=probs,
        n_used=sum(len(m) for m in members.values()),
        n_steps=T,
        n_skipped=skip,
        n_unparseable=n_unparseable,
        cluster_ids=cluster_ids,
        all_unparseable=all_unparseable,
    )


def vote_from_result(result: TSEResult) -> VoteResult:
    """Heaviest parseable cluster of a TSE result; a weight tie goes to the cluster seen latest (closest to final)."""
    parseable = [c for c in result.clusters if c.representative is not None]
    if not parseable:
        return VoteResult(None, 0.0, None, None)
    best = max(parseable, key=lambda c: (c.weight, c.steps[-1]))
    return VoteResult(best.representative, best.probability, best.id, best.steps[-1])


def temporal_vote(
    answers: Sequence[str | None],
    *,
    weights: Sequence[float] | None = None,
    skip_ratio: float = 0.5,
    cluster: Clusterer | str = "exact",
    drop_unparseable: bool = True,
) -> VoteResult:
    """Temporal self-consistency vote: a* = argmax_C sum_{s in C} w(s) (zero extra forward passes)."""
    return vote_from_result(
        temporal_semantic_entropy(
            answers, weights=weights, skip_ratio=skip_ratio, cluster=cluster, drop_unparseable=drop_unparseable
        )
    )


def flip_rate(answers: Sequence[str | None], *, skip_ratio: float = 0.5, cluster: Clusterer | str = "exact") -> float:
    """Answer changes / transitions among the parseable steps after the skip (0.0 with fewer than two)."""
    clusterer = make_clusterer(cluster) if isinstance(cluster, str) else cluster
    skip = num_skipped(len(answers), skip_ratio)
    parsed = [a for a in answers[skip:] if a is not None]
    return flip_rate_from_ids(clusterer(parsed) if parsed else [])


def flip_rate_from_ids(ids: Sequence[int | None]) -> float:
    """Flip rate over a sequence of cluster ids (None entries are ignored)."""
    seq = [c for c in ids if c is not None]
    if len(seq) < 2:
        return 0.0
    return sum(a != b for a, b in zip(seq, seq[1:], strict=False)) / (len(seq) - 1)


def mean_token_entropy(trajectory: Trajectory, *, skip_ratio: float = 0.0) -> float | None:
    """Mean over steps of TrajectoryStep.mean_entropy (nats over the span's masked positions); None if unrecorded."""
    skip = num_skipped(len(trajectory.steps), skip_ratio)
    vals = [s.mean_entropy for s in trajectory.steps[skip:] if s.mean_entropy is not None]
    return sum(vals) / len(vals) if vals else None


def final_confidence(trajectory: Trajectory, *, stop_ids: Sequence[int] = ()) -> float | None:
    """Mean confidence of the committed tokens of the final span (each position's last commit), up to the first
    stop id of ``trajectory.final`` when ``stop_ids`` is given. None if nothing was committed there."""
    conf: dict[int, float] = {}
    for s in trajectory.steps:
        for p, c in zip(s.committed, s.confidences, strict=False):
            conf[p] = float(c)
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(trajectory.final) if t in stops), trajectory.gen_length)
    vals = [c for p, c in conf.items() if p < end]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------- degenerate drafts

_WORD_RE = re.compile(r"\w+(?:'\w+)?")


def degeneracy(text: str, *, min_words: int = 2) -> str | None:
    """Why a draft is degenerate, or None. Checked on the words of the text (case-folded):

    - near-empty: fewer than ``min_words`` words;
    - a loop: one word three times in a row ("a a a"), or a phrase of 2-8 words three times in a row
      ("tea of tea of tea of");
    - a phrase of 3+ words repeated three times anywhere ("you will need ... you will need ... you will need").

    Fluent short plans rarely do any of these; the small planner's failure mode (measured in
    benchmarks/README.md, "TSE as a signal") does."""
    words = [w.casefold() for w in _WORD_RE.findall(text)]
    if len(words) < min_words:
        return f"near-empty ({len(words)} word{'s' if len(words) != 1 else ''})"
    n = len(words)
    for size in range(1, 9):
        for i in range(0, n - 3 * size + 1):
            a = words[i : i + size]
            if a == words[i + size : i + 2 * size] == words[i + 2 * size : i + 3 * size]:
                return f"loop: {' '.join(a)!r} three times in a row"
    for size in range(3, 9):
        seen: dict[tuple[str, ...], list[int]] = {}
        for i in range(n - size + 1):
            key = tuple(words[i : i + size])
            starts = seen.setdefault(key, [])
            if not starts or i - starts[-1] >= size:  # non-overlapping occurrences
                starts.append(i)
                if len(starts) >= 3:
                    return f"repeated phrase: {' '.join(key)!r} three times"
    return None


# -------------------------------------------------------------------------------------- config + driver


@dataclass(frozen=True)
class TSEConfig:
    """How a trajectory is scored. Names are checked against the registries at construction."""

    skip_ratio: float = 0.5
    weighting: Weighting = "exp"
    alpha: float = 5.0
    extractor: str = "full_text"
    clusterer: str = "embedding"
    threshold: float = 0.85  # cosine, "embedding" clusterer only (see tests/test_tse.py for measured values)
    drop_unparseable: bool = True

    def __post_init__(self) -> None:
        _check_skip(self.skip_ratio)
        _lookup(WEIGHTINGS, self.weighting, "weighting")
        _lookup(EXTRACTORS, self.extractor, "extractor")
        _lookup(CLUSTERERS, self.clusterer, "clusterer")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine in [-1, 1], got {self.threshold}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrajectoryScore:
    tse: float  # bits
    vote: str | None  # voted answer (extracted form)
    vote_share: float
    vote_step: int | None  # step whose x0-hat holds the voted answer in full (its latest occurrence)
    flip_rate: float
    mean_entropy: float | None
    n_clusters: int
    n_used: int
    n_steps: int
    final_answer: str | None  # extracted from the last step's x0-hat
    detail: TSEResult = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    final_confidence: float | None = None  # mean commit confidence over the final span (see final_confidence)
    degenerate: str | None = None  # why the final text is degenerate (see degeneracy), None if it is not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def signals(self) -> dict[str, float | None]:
        """Every registered signal, oriented so that higher means less trustworthy."""
        return {name: fn(self) for name, fn in SIGNALS.items()}

    def value(self, signal: str) -> float:
        """The named signal (higher = less trustworthy); +inf when it is undefined or the draft is degenerate,
        so a degenerate or unscorable draft is never accepted."""
        v = _lookup(SIGNALS, signal, "signal")(self)
        if self.degenerate is not None or v is None or math.isnan(v):
            return math.inf
        return float(v)


# Signals for "this draft is wrong", all oriented higher = less trustworthy (benchmarks/bench_tse.py measures
# each one's AUROC; config `score.signal` picks the one the graph accepts or revises on).
SIGNALS: dict[str, Callable[[TrajectoryScore], float | None]] = {
    "tse": lambda s: s.tse,
    "flip_rate": lambda s: s.flip_rate,
    "mean_entropy": lambda s: s.mean_entropy,
    "low_confidence": lambda s: None if s.final_confidence is None else 1.0 - s.final_confidence,
    "vote_dissent": lambda s: 1.0 - s.vote_share,
}
# the signals that need every x0-hat's text clustered (sentence embeddings, with the default clusterer): the
# others read the trajectory alone
CLUSTER_SIGNALS = frozenset({"tse", "flip_rate", "vote_dissent"})


def score_trajectory(
    trajectory: Trajectory,
    decode: Callable[[Sequence[int]], str],
    config: TSEConfig | None = None,
    *,
    embed: EmbedFn | None = None,
    extract: Extractor | None = None,
    cluster: Clusterer | None = None,
    stop_ids: Sequence[int] = (),
) -> TrajectoryScore:
    """Decode every step's x0-hat, extract, cluster once, and return TSE, vote, flip rate and mean entropy.

    Identical x0-hat rows are decoded once. ``embed`` overrides the default MiniLM embedder; ``extract`` and
    ``cluster`` override the config's registered extractor / clusterer with any callable. ``stop_ids`` end the
    span for the final confidence; the degeneracy check reads the decoded final span.
    """
    cfg = config or TSEConfig()
    cache: dict[tuple[int, ...], str | None] = {}
    texts: dict[tuple[int, ...], str] = {}

    def text_of(ids: Sequence[int]) -> str:
        key = tuple(ids)
        if key not in texts:
            texts[key] = decode(ids)
        return texts[key]

    extract = extract or get_extractor(cfg.extractor)
    answers: list[str | None] = []
    for s in trajectory.steps:
        key = tuple(s.x0_hat)
        if key not in cache:
            cache[key] = extract(text_of(s.x0_hat))
        answers.append(cache[key])
    res = temporal_semantic_entropy(
        answers,
        weights=step_weights(len(answers), cfg.weighting, cfg.alpha),
        skip_ratio=cfg.skip_ratio,
        cluster=cluster or make_clusterer(cfg.clusterer, threshold=cfg.threshold, embed=embed),
        drop_unparseable=cfg.drop_unparseable,
    )
    vote = vote_from_result(res)
    parse_ids = [c if (c is not None and answers[i] is not None) else None for i, c in enumerate(res.cluster_ids)]
    return TrajectoryScore(
        tse=res.tse_bits,
        vote=vote.answer,
        vote_share=vote.share,
        vote_step=vote.step,
        flip_rate=flip_rate_from_ids(parse_ids),
        mean_entropy=mean_token_entropy(trajectory),
        n_clusters=len(res.clusters),
        n_used=res.n_used,
        n_steps=res.n_steps,
        final_answer=answers[-1] if answers else None,
        detail=res,
        config=cfg.to_dict(),
        final_confidence=final_confidence(trajectory, stop_ids=stop_ids),
        degenerate=degeneracy(text_of(_final_span(trajectory, stop_ids))),
    )


def _final_span(trajectory: Trajectory, stop_ids: Sequence[int]) -> list[int]:
    """The final tokens up to the first stop id (all of them without stop ids)."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(trajectory.final) if t in stops), trajectory.gen_length)
    return list(trajectory.final[:end])


# ----------------------------------------------------------------------------------------------- helpers


def _lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}") from None


def _check_skip(skip_ratio: float) -> None:
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio}")
