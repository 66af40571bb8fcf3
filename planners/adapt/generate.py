"""Batched autoregressive generation with the native backbone: the teacher for self-distillation on a GPU.

`generate(model, prompts, ...)` answers many prompts at once under causal attention, with left padding (real
tokens take positions 0.. in each row) and a KV cache over prompt + answer, so each step runs one position per
row. Greedy at temperature 0, else temperature sampling with nucleus (top-p) filtering from a seeded generator.
On a CPU the llama.cpp teacher (`planners.adapt.data.distill`) is faster; on a GPU this one decodes hundreds of
answers per step. The model should be the untouched AR model (no adapter, or the adapter switched off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from planners.model import DiffusionBackbone, KVCache, attention_mask, position_ids_from_valid


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else softmax(logits / T) restricted to the
    smallest set of tokens whose probability reaches `top_p` (the top token always kept)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p  # tokens whose predecessors already reach top_p
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DiffusionBackbone,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    exclude_ids: Sequence[int] = (),
) -> list[tuple[list[int], bool]]:
    """Answer each prompt (a list of ids ending with the assistant header): [(answer ids, finished)], in order.
    An answer ends at the first id in `stop_ids`, which is kept as its last id (finished), or after
    `max_new_tokens` ids (not finished). `exclude_ids` are never generated (e.g. a diffusion mask id)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = model.device
    b, plen = len(prompts), max(len(p) for p in prompts)
    length = plen + max_new_tokens
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, plen - len(p) : plen] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, plen - len(p) :] = True  # the prompt, then every answer position
    ids, valid = ids.to(dev), valid.to(dev)
    pos = position_ids_from_valid(valid)
    attn = attention_mask(valid, pattern="causal", gen_start=0)  # (B, 1, L, L)
    w = model.embed_tokens.weight
    cache = KVCache.allocate(model.config, b, length, dtype=w.dtype, device=dev)
    stops = torch.as_tensor(list(stop_ids), dtype=torch.long, device=dev)
    banned = torch.as_tensor(list(exclude_ids), dtype=torch.long, device=dev)

    def step(start: int, end: int) -> torch.Tensor:
        h = model.hidden_states(
            ids[:, start:end], attention_mask=attn[:, :, start:end], position_ids=pos[:, start:end],
            cache=cache, cache_start=start,
        )  # fmt: skip
        logits = (h[:, -1] @ model.output_weight().t()).float()
        if len(banned):
            logits[:, banned] = float("-inf")
        return logits

    logits = step(0, plen)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    ended = torch.full((b,), max_new_tokens, dtype=torch.long, device=dev)  # answer length per row
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ids[:, plen + t] = nxt
        stop_now = ~done & torch.isin(nxt, stops)
        ended = torch.where(stop_now, torch.full_like(ended, t + 1), ended)
        done |= stop_now
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = step(plen + t, plen + t + 1)
    answers = ids[:, plen:].tolist()
    lens, fin = ended.tolist(), done.tolist()
    return [(answers[i][: lens[i]], bool(fin[i])) for i in range(b)]
