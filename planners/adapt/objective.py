"""The block-diffusion SFT objective in the two-copy layout (BD3-LM, arXiv 2503.09573; Fast-dLLM v2, 2509.26328).

One training row per example: ``prompt (P) | noisy response (R) | clean response (R) | padding``.
The response is cut into blocks of `block_size`; block b of the noisy copy attends to the prompt, to the
clean copy's blocks < b and to itself (bidirectionally); the clean copy attends to the prompt and to itself
with `clean` attention — "block_causal" (the pattern the sampler runs: a committed block is bidirectional
inside, causal across blocks; default) or "causal" (the AR model's own pattern; enables the AR term).
Both copies carry the same position ids, so noisy block b sits exactly where the sampler denoises it.

Loss (LLaDA / MDLM SFT, LLaDA eq. 5): per block t ~ U(eps, 1), each response token masked with probability
t, cross-entropy on masked tokens weighted 1/t, prompt never masked, normalised by response length. With the
Dream-style shift (`config.shift`: logits at i predict token i + 1) token r of a block is read from noisy
position r - 1 of the same block, except the block's first token: its predecessor lies in the previous block,
so it is read from the clean copy (the last prompt position for r = 0) — the logit the sampler reads from
its committed prefix. That logit does not depend on the block's noise, so it is trained on every example
with weight 1 (the expectation of mask-with-prob-t × 1/t, without the variance). The optional AR term
(TiDAR, arXiv 2511.08923) is next-token CE on the clean copy, only where it cannot see its target.

Pure tensor code: token ids in, (loss, stats) out. Knows no tokenizer, no optimiser, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from planners.model import DiffusionBackbone

CleanAttention = Literal["block_causal", "causal"]
PROMPT, NOISY, CLEAN, PAD = 0, 1, 2, 3


@dataclass
class Batch:
    """A padded two-copy batch. `response` holds the clean response ids, block-aligned per row."""

    input_ids: torch.Tensor  # (B, L) prompt | noisy | clean | pad
    position_ids: torch.Tensor  # (B, L)
    attn: torch.Tensor  # (B, 1, L, L) bool, True = may attend
    src: torch.Tensor  # (N,) flat index (row * L + col) of the logit predicting each target
    tgt: torch.Tensor  # (N,) target token ids
    weight: torch.Tensor  # (N,) loss weight (1/t for masked tokens, 1 for block-first tokens)
    masked: torch.Tensor  # (N,) bool: the target was masked in the noisy copy (or is block-first)
    ar_src: torch.Tensor  # (M,) flat index of clean-copy logits for the AR term
    ar_tgt: torch.Tensor  # (M,)
    n_response: int  # response tokens in the batch (the loss normaliser)
    n_tokens: int  # real (non-pad) tokens in the rows


def pad_response(response: list[int], block_size: int, eos_id: int, finished: bool) -> list[int]:
    """Block-align a response: a finished one is filled with EOS to the next block boundary (LLaDA pads
    with EOS so the model learns to end), an unfinished one is cut back to whole blocks."""
    if finished:
        return response + [eos_id] * (-len(response) % block_size)
    return response[: len(response) - len(response) % block_size]


def layout(
    prompt_len: torch.Tensor, resp_len: torch.Tensor, length: int, block_size: int, clean: CleanAttention
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kind (B, L), position ids (B, L) and the boolean attention mask (B, 1, L, L) of the two-copy layout
    for rows with `prompt_len` (B,) prompt and `resp_len` (B,) (block-aligned) response tokens."""
    cols = torch.arange(length)[None]  # (1, L)
    p, r = prompt_len[:, None], resp_len[:, None]
    kind = torch.full((len(prompt_len), length), PAD)
    kind = torch.where(cols < p + 2 * r, CLEAN, kind)
    kind = torch.where(cols < p + r, NOISY, kind)
    kind = torch.where(cols < p, PROMPT, kind)
    ridx = torch.where(kind == NOISY, cols - p, torch.where(kind == CLEAN, cols - p - r, 0))  # response index
    pos = torch.where(kind == PROMPT, cols, torch.where(kind == PAD, 0, p + ridx))
    blk = ridx // block_size

    kq, kk = kind[:, :, None], kind[:, None, :]  # query / key kinds (B, L, L)
    rq, rk = ridx[:, :, None], ridx[:, None, :]
    bq, bk = blk[:, :, None], blk[:, None, :]
    cq, ck = cols[:, :, None], cols[:, None, :]
    real_q = kq != PAD
    to_prompt = (kk == PROMPT) & ((kq != PROMPT) | (ck <= cq)) & real_q
    noisy_noisy = (kq == NOISY) & (kk == NOISY) & (bq == bk)
    noisy_clean = (kq == NOISY) & (kk == CLEAN) & (bk < bq)
    clean_clean = (kq == CLEAN) & (kk == CLEAN) & ((rk <= rq) if clean == "causal" else (bk <= bq))
    attn = to_prompt | noisy_noisy | noisy_clean | clean_clean | (cq == ck)
    return kind, pos, attn[:, None]


def make_batch(
    rows: list[tuple[list[int], list[int]]],
    *,
    block_size: int,
    mask_id: int,
    pad_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    clean: CleanAttention = "block_causal",
    ar_term: bool = False,
    fixed_ratio: float | None = None,
) -> Batch:
    """Noise `rows` of (prompt ids, block-aligned response ids) into a two-copy batch. `fixed_ratio`
    replaces t ~ U(eps, 1) by a constant masking probability (held-out masked accuracy)."""
    b = len(rows)
    plen = torch.tensor([len(p) for p, _ in rows])
    rlen = torch.tensor([len(r) for _, r in rows])
    if (plen < 1).any() or (rlen % block_size).any():
        raise ValueError("every row needs a prompt and a block-aligned response")
    length = int((plen + 2 * rlen).max())
    kind, pos, attn = layout(plen, rlen, length, block_size, clean)
    ids = torch.full((b, length), pad_id)
    src, tgt, wt, msk, ar_src, ar_tgt = [], [], [], [], [], []
    for i, (prompt, resp) in enumerate(rows):
        p, r = len(prompt), len(resp)
        y = torch.tensor(resp)
        nb = r // block_size
        if fixed_ratio is None:
            t = eps + (1 - eps) * torch.rand(nb, generator=generator)  # one t per block
        else:
            t = torch.full((nb,), float(fixed_ratio))
        t_tok = t.repeat_interleave(block_size)  # (R,)
        m = torch.rand(r, generator=generator) < t_tok
        ids[i, :p] = torch.tensor(prompt)
        ids[i, p : p + r] = torch.where(m, mask_id, y)
        ids[i, p + r : p + 2 * r] = y
        ri = torch.arange(r)
        first = ri % block_size == 0
        # token r is read at noisy r-1 inside a block; at clean r-1 (the last prompt position for r=0) at a block start
        s = torch.where(first, torch.where(ri == 0, p - 1, p + r + ri - 1), p + ri - 1)
        use = first | m
        if fixed_ratio is not None:
            use = m  # held-out accuracy: exactly the masked tokens
        w = torch.where(first, torch.ones(r), 1.0 / t_tok)
        src.append(i * length + s[use])
        tgt.append(y[use])
        wt.append(w[use] if fixed_ratio is None else torch.ones(int(use.sum())))
        msk.append(use[use])
        if ar_term:
            leak_free = ~first if clean == "causal" else torch.zeros(r, dtype=torch.bool)
            ar_src.append(i * length + (p + r + ri - 1)[leak_free])
            ar_tgt.append(y[leak_free])
    cat = lambda xs, dt=torch.long: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    return Batch(
        input_ids=ids,
        position_ids=pos,
        attn=attn,
        src=cat(src),
        tgt=cat(tgt),
        weight=cat(wt, torch.float32),
        masked=cat(msk, torch.bool),
        ar_src=cat(ar_src),
        ar_tgt=cat(ar_tgt),
        n_response=int(rlen.sum()),
        n_tokens=int((kind != PAD).sum()),
    )


def logits_at(model: DiffusionBackbone, batch: Batch, flat_index: torch.Tensor, h: torch.Tensor | None = None):
    """Logits (N, V) only at the flat positions asked for: the LM head over ~half the rows, not all."""
    if h is None:
        h = model.hidden_states(batch.input_ids, attention_mask=batch.attn, position_ids=batch.position_ids)
    rows = h.reshape(-1, h.shape[-1])[flat_index]  # (N, D)
    logits = rows @ model.output_weight().t()  # (N, V)
    return logits, h


def certainty_loss(logits: torch.Tensor, tgt: torch.Tensor, temperature: float = 0.5) -> tuple[torch.Tensor, int]:
    """dParallel's certainty term (arXiv 2509.26488): the mean entropy of softmax(logits / temperature) over the
    predictions whose argmax already is the target, and how many there were. Minimising it makes the model sure
    of what it gets right, so more positions clear a commit threshold in the same pass; wrong predictions are left
    to the cross-entropy term."""
    right = logits.argmax(-1) == tgt
    n = int(right.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    logp = F.log_softmax(logits[right].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(), n


def loss_fn(
    model: DiffusionBackbone,
    batch: Batch,
    *,
    ar_weight: float = 0.0,
    certainty_weight: float = 0.0,
    certainty_temperature: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """Diffusion loss (+ ar_weight × AR loss, + certainty_weight × `certainty_loss` over the masked targets) for
    one batch, and float stats for logging."""
    dev = next(model.parameters()).device
    h = model.hidden_states(
        batch.input_ids.to(dev), attention_mask=batch.attn.to(dev), position_ids=batch.position_ids.to(dev)
    )
    logits, _ = logits_at(model, batch, batch.src.to(dev), h)
    ce = F.cross_entropy(logits.float(), batch.tgt.to(dev), reduction="none")  # (N,)
    diff = (ce * batch.weight.to(dev)).sum() / max(batch.n_response, 1)
    loss = diff
    stats = {"diff": float(diff.detach())}
    if certainty_weight > 0:
        # every target of a batch is a masked (or block-first) position: no (N, V) copy to select them
        cert, n_right = certainty_loss(logits, batch.tgt.to(dev), certainty_temperature)
        loss = loss + certainty_weight * cert
        stats["cert"] = float(cert.detach())
        stats["right"] = n_right / max(len(batch.tgt), 1)
    if ar_weight > 0 and len(batch.ar_src):
        ar_logits, _ = logits_at(model, batch, batch.ar_src.to(dev), h)
        ar = F.cross_entropy(ar_logits.float(), batch.ar_tgt.to(dev))
        loss = loss + ar_weight * ar
        stats["ar"] = float(ar.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats
