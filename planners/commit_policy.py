"""Learned commit policy: a tiny MLP that says which masked tokens of a block are already final.

Learn2PD (arXiv 2509.25188) replaces the hand-set confidence threshold of parallel decoding with a small
learned filter: trained on the model's own conservative (one token per pass) trajectories to predict, for
every still-masked position, whether its current argmax already equals the token the conservative decoding
ends with. Positions it calls final are committed together, so a pass commits several tokens where the
threshold rule commits about one.

Here the filter reads per-position statistics of one denoising step (`FEATURES`: the token's probability,
margin and entropy, its place in the block and the span, how much of the block is still masked, the
neighbours' confidences, whether the guess repeats a neighbour or ends the answer) and returns P(final) per
position, shape (B, W). It is model-agnostic arithmetic over those statistics (no hidden states), a few
thousand parameters, run once per step on the whole batch with tensor ops (no host reads).

`commit="learned"` in `planners.strategies` uses it; `load_commit_policy(path)` reads the shipped weights
(`planners/weights/smollm2-commit-policy.safetensors` + its `.json`: features, training set, held-out metrics).
Training lives in `planners.adapt.train_commit`. Nothing here runs the backbone or the sampler loop.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from planners.strategies import CommitInputs

__all__ = ["DEFAULT_COMMIT_POLICY", "FEATURES", "CommitPolicy", "features", "load_commit_policy"]

DEFAULT_COMMIT_POLICY = Path(__file__).resolve().parent / "weights" / "smollm2-commit-policy.safetensors"

# One row per masked position; W = block length. Order matters: it is the weights' input layout.
FEATURES: tuple[str, ...] = (
    "prob",  # p(argmax)
    "margin",  # p1 - p2
    "entropy",  # nats
    "log_odds_certain",  # -log(1 - p + 1e-6): separates 0.99 from 0.9999
    "offset",  # position in the block / W
    "leftmost",  # 1: no masked position to its left in the block
    "masked_left",  # masked positions to its left / W
    "masked_block",  # masked positions in the block / W
    "step",  # denoising step inside the block / W
    "span_offset",  # tokens of the span before this block / 64 (absolute: the same for 48- and 64-token plans)
    "left_conf",  # the left neighbour's p(argmax) if masked, 1 if committed (or in the previous, final block)
    "right_conf",  # the right neighbour's p(argmax) if masked, 1 if committed, 0 past the block end
    "is_stop",  # the argmax is a stop id (EOS / end of turn)
    "same_as_left",  # the argmax equals the left neighbour's token (committed, or its argmax)
    "same_as_right",  # ... the right neighbour's
    "left_is_stop",  # the left neighbour's token is a stop id
)


@torch.no_grad()
def features(c: CommitInputs) -> torch.Tensor:
    """Per-position features of one step, (B, W, len(FEATURES)) float32. Needs `c.stats` (the step's token
    statistics), `c.context` ((B, W + 1): the token left of the block, then the block's tokens now) and
    `c.stop_ids`; deterministic (no noise, no host reads)."""
    if c.stats is None or c.context is None:
        raise ValueError("the learned commit policy needs CommitInputs.stats and CommitInputs.context")
    st, m = c.stats, c.masked
    b, w = m.shape
    p = st.prob.float()  # (B, W)
    mf = m.float()
    now = c.context[:, 1:]  # (B, W) tokens now (mask ids where masked)
    guess = torch.where(m, st.token, now)  # (B, W): committed token, else the current argmax
    left_tok = torch.cat([c.context[:, :1], guess[:, :-1]], 1)
    right_tok = torch.cat([guess[:, 1:], torch.full_like(guess[:, :1], -1)], 1)
    conf_now = torch.where(m, p, torch.ones_like(p))
    left_conf = torch.cat([torch.ones_like(p[:, :1]), conf_now[:, :-1]], 1)
    right_conf = torch.cat([conf_now[:, 1:], torch.zeros_like(p[:, :1])], 1)
    stops = c.stop_ids if c.stop_ids is not None else torch.empty(0, dtype=torch.long, device=p.device)
    masked_left = mf.cumsum(-1) - mf
    offset = torch.arange(w, device=p.device, dtype=torch.float32).expand(b, w) / w
    cols = [
        p,
        st.margin.float(),
        st.entropy.float(),
        -torch.log((1 - p).clamp(min=0) + 1e-6),
        offset,
        (masked_left == 0).float(),
        masked_left / w,
        mf.sum(-1, keepdim=True).expand(b, w) / w,
        torch.full_like(p, c.step / w),
        torch.full_like(p, (c.block * w if c.span_offset is None else c.span_offset) / 64),
        left_conf,
        right_conf,
        torch.isin(st.token, stops).float(),
        (st.token == left_tok).float(),
        (st.token == right_tok).float(),
        torch.isin(left_tok, stops).float(),
    ]
    return torch.stack(cols, -1)


class CommitPolicy(nn.Module):
    """Standardise the features, then a 2-hidden-layer MLP (SiLU) to one logit per position: P(final)."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = 32) -> None:
        super().__init__()
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )
        self.meta: dict[str, Any] = {}

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (..., F) -> logits (...)."""
        return self.net((feats - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def forward(self, c: CommitInputs) -> torch.Tensor:
        """P(final) per position of the step's block, (B, W) float32 (masked or not: the rule masks)."""
        return torch.sigmoid(self.logits(features(c).to(self.mean.device)))

    def save(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        """Weights as safetensors, and a sidecar `.json`: features, sizes, training set, held-out metrics."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()}, str(path))
        n = sum(p.numel() for p in self.parameters())
        info = {"features": list(FEATURES), "hidden": self.hidden, "parameters": n, **meta}
        path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")


def load_commit_policy(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> CommitPolicy:
    """The policy at `path` (None: the shipped one), on `device`; cached per (path, mtime, device)."""
    p = Path(path) if path is not None else DEFAULT_COMMIT_POLICY
    if not p.is_file():
        raise FileNotFoundError(f"commit policy weights not found: {p} (commit='learned' needs a .safetensors file)")
    return _load(str(p.resolve()), p.stat().st_mtime_ns, str(torch.device(device)))


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: int, device: str) -> CommitPolicy:
    del mtime  # part of the cache key only
    sidecar = Path(path).with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    names = meta.get("features", list(FEATURES))
    if list(names) != list(FEATURES):
        raise ValueError(f"commit policy {path} was trained on features {names}; this code computes {list(FEATURES)}")
    try:
        state = load_file(path)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"commit policy {path} is not a readable safetensors file: {e}") from None
    hidden = int(meta.get("hidden", state["net.0.weight"].shape[0] if "net.0.weight" in state else 32))
    policy = CommitPolicy(len(FEATURES), hidden)
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"commit policy {path} does not fit CommitPolicy(hidden={hidden}): {e}") from None
    policy.meta = meta
    return policy.to(device).eval().requires_grad_(False)


def bce_metrics(prob: torch.Tensor, label: torch.Tensor, thresholds=(0.5, 0.7, 0.9)) -> dict[str, float]:
    """Binary cross-entropy, accuracy, and per threshold the precision / recall of calling positions final."""
    prob, label = prob.double(), label.double()
    eps = 1e-9
    bce = -(label * (prob + eps).log() + (1 - label) * (1 - prob + eps).log()).mean()
    out = {"n": int(label.numel()), "positive_rate": round(float(label.mean()), 4), "bce": round(float(bce), 4)}
    out["accuracy"] = round(float(((prob >= 0.5).double() == label).double().mean()), 4)
    for t in thresholds:
        called = prob >= t
        tp = float((called & (label > 0)).sum())
        out[f"precision@{t}"] = round(tp / max(float(called.sum()), 1.0), 4)
        out[f"recall@{t}"] = round(tp / max(float(label.sum()), 1.0), 4)
    return {k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in out.items()}
