"""Held-out metrics for an adapted planner, computed the same way during training and after it.

- masked-token accuracy at fixed mask ratios (default .25 / .5 / 1.0): the two-copy layout with every
  response token masked with that probability (all blocks at once, clean context before each block),
  argmax over the vocabulary without the mask id, accuracy over the masked tokens;
- next-token accuracy: the same weights under plain causal attention on prompt + response (does the
  adapter keep the AR model's own predictions? the targets are the AR model's greedy answers, so the
  untouched model scores ≈1.0 here);
- held-out diffusion loss with a fixed noise seed.

Deterministic (fixed generator seed), no gradients. Knows no files and no tokenizer.
"""

from __future__ import annotations

import torch

from planners.adapt.objective import CleanAttention, loss_fn, make_batch
from planners.model import DiffusionBackbone, attention_mask

RATIOS = (0.25, 0.5, 1.0)


def _chunks(rows: list, size: int):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@torch.no_grad()
def masked_accuracy(
    model: DiffusionBackbone,
    rows: list[tuple[list[int], list[int]]],
    ratio: float,
    *,
    clean: CleanAttention = "block_causal",
    seed: int = 1234,
    batch_size: int = 8,
) -> float:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    right = total = 0
    for chunk in _chunks(rows, batch_size):
        b = make_batch(
            chunk,
            block_size=c.block_size,
            mask_id=c.mask_token_id,
            pad_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
            generator=g,
            clean=clean,
            fixed_ratio=ratio,
        )
        if not len(b.src):
            continue
        dev = model.device
        h = model.hidden_states(b.input_ids.to(dev), attention_mask=b.attn.to(dev), position_ids=b.position_ids.to(dev))
        logits = (h.reshape(-1, h.shape[-1])[b.src.to(dev)] @ model.output_weight().t()).float()  # (N, V)
        logits[:, c.mask_token_id] = float("-inf")
        right += int((logits.argmax(-1) == b.tgt.to(dev)).sum())
        total += len(b.tgt)
    return right / max(total, 1)


@torch.no_grad()
def next_token_accuracy(model: DiffusionBackbone, rows: list[tuple[list[int], list[int]]], *, batch_size: int = 8):
    """Causal attention, teacher forcing: how often argmax at position i equals token i + 1 over the response."""
    right = total = 0
    pad = model.config.eos_token_id
    for chunk in _chunks(rows, batch_size):
        seqs = [p + r for p, r in chunk]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), pad)
        valid = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            valid[i, : len(s)] = True
        attn = attention_mask(valid, pattern="causal", gen_start=0)
        dev = model.device
        logits = model(ids.to(dev), attention_mask=attn.to(dev))  # (B, L, V), right padding: positions are 0..
        pred = logits.argmax(-1).cpu()
        for i, (p, r) in enumerate(chunk):
            got = pred[i, len(p) - 1 : len(p) + len(r) - 1]
            right += int((got == torch.tensor(r)).sum())
            total += len(r)
    return right / max(total, 1)


@torch.no_grad()
def heldout_loss(model: DiffusionBackbone, rows, *, clean: CleanAttention = "block_causal", seed: int = 99) -> float:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    losses, weights = [], []
    for chunk in _chunks(rows, 8):
        b = make_batch(
            chunk, block_size=c.block_size, mask_id=c.mask_token_id, pad_id=c.eos_token_id, generator=g, clean=clean
        )
        loss, _ = loss_fn(model, b)
        losses.append(float(loss) * b.n_response)
        weights.append(b.n_response)
    return sum(losses) / max(sum(weights), 1)


def evaluate(
    model: DiffusionBackbone,
    rows: list[tuple[list[int], list[int]]],
    *,
    ratios: tuple[float, ...] = RATIOS,
    clean: CleanAttention = "block_causal",
    with_loss: bool = True,
) -> dict[str, float]:
    """Held-out metrics as a flat dict: acc@<ratio>, acc_mean, next_token_acc (, loss)."""
    was_training = model.training
    model.eval()
    out = {f"acc@{r:g}": round(masked_accuracy(model, rows, r, clean=clean), 4) for r in ratios}
    out["acc_mean"] = round(sum(out[f"acc@{r:g}"] for r in ratios) / len(ratios), 4)
    out["next_token_acc"] = round(next_token_accuracy(model, rows), 4)
    if with_loss:
        out["loss"] = round(heldout_loss(model, rows, clean=clean), 4)
    model.train(was_training)
    return out
