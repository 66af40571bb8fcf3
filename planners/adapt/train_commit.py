"""Train the learned commit policy (`planners.commit_policy`, Learn2PD arXiv 2509.25188) on the planner's own
trajectories.

1. Decode prompts of the adaptation TRAIN split conservatively — one token per pass (the top-1 masked position
   by max probability; blocks of 8, prefix cache) — and record, at every step, the features of every still-masked
   position and its current argmax.
2. Label a position "final" when that argmax equals the token the conservative decoding ends with there.
3. Fit the small MLP by binary cross-entropy (AdamW, full-batch), standardising the features.
4. Report held-out metrics on trajectories of HELD-OUT prompts (topics never in training, and not the ones
   `benchmarks.bench_planner_quality` samples), and write weights + metadata beside the adapter.

    python -m planners.adapt.train_commit                             # -> planners/weights/smollm2-commit-policy.*
    python -m planners.adapt.train_commit --train-prompts 64 --out /tmp/p.safetensors   # a quick run

The recording reuses the sampler's real loop: `commit="learned"` with a stand-in policy that records what it
sees and never fires, so the rule commits exactly the top-1 position per pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch

import planners.commit_policy as cp
from planners.commit_policy import DEFAULT_COMMIT_POLICY, FEATURES, CommitPolicy, bce_metrics, features


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_COMMIT_POLICY))
    p.add_argument("--adapter", default=None, help="planner adapter (default: the shipped one)")
    p.add_argument("--train-prompts", type=int, default=320)
    p.add_argument("--heldout-prompts", type=int, default=40, help="held-out prompts after the benchmark's 20")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--epochs", type=int, default=400, help="full-batch optimiser steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data", default=None, help="cache of the recorded trajectories (.pt): read if present, else written"
    )
    return p.parse_args(argv)


class _Recorder:
    """Stands in for the policy: records (features, argmax, span position, row) of every masked position at
    every step, and returns P(final) = 0, so `commit_learned` commits only the top-1 position."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, c) -> torch.Tensor:
        f = features(c)  # (B, W, F)
        b, w = c.masked.shape
        pos = c.block * self.block + torch.arange(w).expand(b, w)
        row = torch.arange(b)[:, None].expand(b, w)
        m = c.masked
        self.rows.append((f[m], c.stats.token[m], pos[m], row[m]))
        return torch.zeros(b, w)


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    """The sampler loads the policy through `planners.commit_policy.load_commit_policy`: hand it the recorder."""
    saved = cp.load_commit_policy
    cp.load_commit_policy = lambda path=None, device="cpu": recorder  # type: ignore[assignment]
    try:
        yield
    finally:
        cp.load_commit_policy = saved


def trajectories(model, prompt_ids: list[list[int]], gen_length: int, batch: int, log=print):
    """Conservative decodes of the prompts; returns features (N, F), labels (N,), and the decoded spans."""
    from planners.sampler import SamplerConfig, sample

    block = model.config.block_size
    xs, ys, spans = [], [], []
    for k in range(0, len(prompt_ids), batch):
        rec = _Recorder(block)
        t0 = time.perf_counter()
        with _recording(rec):
            cfg = SamplerConfig(
                gen_length=gen_length, steps=gen_length, block_length=block, commit="learned", cache="prefix"
            )
            out = sample(model, prompt_ids[k : k + batch], cfg)
        final = out.tokens  # (B, G)
        for f, tok, pos, row in rec.rows:
            xs.append(f)
            ys.append((tok == final[row, pos]).float())
        spans += final.tolist()
        log(f"  trajectories {k + len(final)}/{len(prompt_ids)}: {out.nfe} passes, {time.perf_counter() - t0:.0f} s")
    return torch.cat(xs), torch.cat(ys), spans


def fit(x: torch.Tensor, y: torch.Tensor, *, hidden: int, epochs: int, lr: float, seed: int) -> CommitPolicy:
    torch.manual_seed(seed)
    policy = CommitPolicy(x.shape[1], hidden)
    policy.mean.copy_(x.mean(0))
    policy.std.copy_(x.std(0).clamp(min=1e-3))
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(policy.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return policy.eval()


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from planners.adapt.data import chat_prompt_ids, make_prompts
    from planners.assets import DEFAULT_ADAPTER, smollm2_hf_dir
    from planners.loading import load_backbone

    t_start = time.perf_counter()
    base = smollm2_hf_dir()
    adapter = Path(a.adapter) if a.adapter else DEFAULT_ADAPTER
    tok = AutoTokenizer.from_pretrained(str(base))
    model = load_backbone(base, adapter=adapter, mask_token_id=16, merge_adapter=True)
    split = make_prompts(0)
    train = list(split["train"])
    random.Random(a.seed).shuffle(train)
    train = train[: a.train_prompts]
    held = split["heldout"]  # the benchmark samples the first 14 free-text + 6 arithmetic: skip those
    free = [p for p in held if p.kind != "arithmetic"][14:]
    arith = [p for p in held if p.kind == "arithmetic"][6:]
    n_ar = a.heldout_prompts // 5
    heldout = free[: a.heldout_prompts - n_ar] + arith[:n_ar]

    if a.data and Path(a.data).exists():
        x, y, hx, hy, rec_s = torch.load(a.data)
        print(f"trajectories from {a.data}", flush=True)
    else:
        t_rec = time.perf_counter()
        print(f"train trajectories: {len(train)} prompts of the TRAIN split", flush=True)
        x, y, _ = trajectories(model, [chat_prompt_ids(tok, p.text) for p in train], a.gen_length, a.batch)
        print(f"held-out trajectories: {len(heldout)} prompts", flush=True)
        hx, hy, _ = trajectories(model, [chat_prompt_ids(tok, p.text) for p in heldout], a.gen_length, a.batch)
        rec_s = time.perf_counter() - t_rec
        if a.data:
            torch.save((x, y, hx, hy, rec_s), a.data)
    t_fit = time.perf_counter()
    policy = fit(x, y, hidden=a.hidden, epochs=a.epochs, lr=a.lr, seed=a.seed)
    fit_s = time.perf_counter() - t_fit
    with torch.no_grad():
        train_m = bce_metrics(torch.sigmoid(policy.logits(x)), y)
        held_m = bce_metrics(torch.sigmoid(policy.logits(hx)), hy)
        prob_only = {}  # the hand-set rule's view: p(argmax) >= tau as the "final" call
        for t in (0.5, 0.7, 0.9):
            called = hx[:, 0] >= t
            tp = float((called & (hy > 0)).sum())
            prob_only[f"precision@{t}"] = round(tp / max(float(called.sum()), 1.0), 4)
            prob_only[f"recall@{t}"] = round(tp / max(float(hy.sum()), 1.0), 4)
    meta = {
        "method": "Learn2PD-style filter (arXiv 2509.25188): P(current argmax is final) per masked position",
        "label": "argmax == the token the one-token-per-pass decoding (top-1 by max prob, blocks of 8, prefix "
        "cache, fp32, greedy) ends with at that position",
        "planner_adapter": adapter.name,
        "training_set": {
            "prompts": f"planners.adapt.data.make_prompts(0)['train'], shuffled (seed {a.seed}), first {len(train)}",
            "kinds": {k: sum(p.kind == k for p in train) for k in sorted({p.kind for p in train})},
            "gen_length": a.gen_length,
            "positions": int(y.numel()),
        },
        "heldout_set": {
            "prompts": f"make_prompts(0)['heldout']: free-text [14:], arithmetic [6:] ({len(heldout)} prompts; "
            "disjoint from benchmarks.bench_planner_quality's 20)",
            "positions": int(hy.numel()),
        },
        "fit": {"epochs": a.epochs, "lr": a.lr, "optimizer": "AdamW full-batch, cosine", "seconds": round(fit_s, 1)},
        "train_metrics": train_m,
        "heldout_metrics": held_m,
        "heldout_prob_threshold_baseline": prob_only,
        "trajectory_seconds": round(rec_s, 1),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "hardware": "CPU AMD EPYC (AVX2, no AVX512), 2 cores shared with other jobs, 1 torch thread",
        "torch": torch.__version__,
    }
    policy.save(a.out, meta)
    print(json.dumps({"out": a.out, "features": list(FEATURES), **meta}))
    return meta


if __name__ == "__main__":
    main()
