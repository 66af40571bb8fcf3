"""Native transformer backbones for masked-diffusion planners.

One pre-norm decoder stack (RMSNorm, rotary positions, grouped-query attention,
SwiGLU MLP) covers the three families we load: LLaDA (no biases, MHA), Dream
(Qwen2: q/k/v biases, GQA) and Llama-family AR models adapted to diffusion
(SmolLM2: GQA, tied embeddings, a learned mask embedding, optional LoRA). What
differs between them is configuration (`BackboneConfig`) and tensor names
(`planners.loading`), not code.

The model knows nothing about sampling: it maps token ids to logits under a
caller-given attention mask, optionally reading and writing a `KVCache` so the
sampler can recompute only part of the sequence (prefix / dual cache). It does
not shift logits either: `config.shift` tells the sampler that position i
predicts token i+1 (Dream, adapted AR models).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Arch = Literal["llada", "dream", "llama"]
AttentionPattern = Literal["full", "block_causal", "causal"]
ATTENTION_PATTERNS: tuple[str, ...] = ("full", "block_causal", "causal")


@dataclass(frozen=True)
class BackboneConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    extra_eos_ids: tuple[int, ...] = ()  # e.g. LLaDA's <|eot_id|>, chat end-of-turn tokens
    delimiter_ids: tuple[int, ...] = ()  # newline / sentence-end tokens: where adaptive blocks may end
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    shift: bool = False  # True: logits at position i predict token i+1 (Dream-style)
    attention: AttentionPattern = "full"
    block_size: int = 0  # for attention == "block_causal": the diffusion block length
    learned_mask_embedding: bool = False  # adapted AR models: a trainable embedding for the mask id
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_PATTERNS:
            raise ValueError(f"attention={self.attention!r}: expected one of {list(ATTENTION_PATTERNS)}")
        if self.attention == "block_causal" and self.block_size <= 0:
            raise ValueError("attention='block_causal' needs block_size > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id, *self.extra_eos_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extra_eos_ids"] = list(self.extra_eos_ids)
        d["delimiter_ids"] = list(self.delimiter_ids)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        d = dict(d)
        d["extra_eos_ids"] = tuple(d.get("extra_eos_ids", ()))
        d["delimiter_ids"] = tuple(d.get("delimiter_ids", ()))
        d["lora_targets"] = tuple(d.get("lora_targets", cls.lora_targets))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); B starts at zero so the adapted model starts as the base model.
    `enabled = False` switches the adapter off (the untouched AR model, e.g. for self-speculative verification)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale
        return y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, L) -> cos, sin (B, 1, L, D), float32
        freqs = position_ids.float()[..., None] * self.inv_freq  # (B, L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


@dataclass
class KVCache:
    """Per-layer key/value buffers over the whole sequence: k[i], v[i] of shape (B, Hkv, L, D).

    The model writes the K/V of the positions it computes at `[start, start + Lq)` and attends
    over `[0, L)`; stale entries are whatever was last written there (the dual cache's approximation)."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(cls, config: BackboneConfig, batch: int, length: int, *, dtype, device) -> KVCache:
        shape = (batch, config.num_kv_heads, length, config.dim_head)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class Attention(nn.Module):
    def __init__(self, c: BackboneConfig) -> None:
        super().__init__()
        self.c = c
        d = c.dim_head
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * d, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        b, lq, _ = x.shape
        d = self.c.dim_head
        q = self.q_proj(x).view(b, lq, self.c.num_heads, d).transpose(1, 2)  # (B, H, Lq, D)
        k = self.k_proj(x).view(b, lq, self.c.num_kv_heads, d).transpose(1, 2)  # (B, Hkv, Lq, D)
        v = self.v_proj(x).view(b, lq, self.c.num_kv_heads, d).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        if cache is not None:
            cache.k[layer][:, :, start : start + lq] = k  # in place: the cache is the model's scratch space
            cache.v[layer][:, :, start : start + lq] = v
            k, v = cache.k[layer], cache.v[layer]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.c.num_kv_heads != self.c.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class MLP(nn.Module):
    def __init__(self, c: BackboneConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: BackboneConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_norm(x))


# ----------------------------------------------------------------------------- model


class DiffusionBackbone(nn.Module):
    """Token ids -> logits for masked-diffusion sampling (see module docstring)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.mask_embedding = nn.Parameter(torch.zeros(c.hidden_size)) if c.learned_mask_embedding else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.dim_head, c.rope_theta)
        if c.lora_rank > 0:
            self.add_lora(c.lora_rank, c.lora_alpha, c.lora_targets)

    # -- adapters ------------------------------------------------------------
    _LORA_SITES = {
        "q": ("attn", "q_proj"),
        "k": ("attn", "k_proj"),
        "v": ("attn", "v_proj"),
        "o": ("attn", "o_proj"),
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj"),
    }

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
        unknown = sorted(set(targets) - set(self._LORA_SITES))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; valid: {sorted(self._LORA_SITES)}")
        for block in self.layers:
            for t in targets:
                parent_name, name = self._LORA_SITES[t]
                parent = getattr(block, parent_name)
                lin = getattr(parent, name)
                if not isinstance(lin, LoRALinear):
                    setattr(parent, name, LoRALinear(lin, rank, alpha).to(lin.weight.device, lin.weight.dtype))
        self.config = _replace(self.config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))

    def set_adapter_enabled(self, enabled: bool) -> None:
        if getattr(self, "lora_merged", False) and not enabled:
            raise RuntimeError(
                "the LoRA adapter is merged into the weights (planners.loading.merge_lora): it cannot "
                "be switched off; load with merge_adapter=False for the untouched base model"
            )
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.enabled = enabled

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what adaptation trains: LoRA matrices and the mask embedding."""
        return {
            k: v.detach().clone()
            for k, v in self.state_dict().items()
            if ".lora_a" in k or ".lora_b" in k or k == "mask_embedding"
        }

    # -- forward ---------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.mask_embedding is not None:
            is_mask = (input_ids == self.config.mask_token_id)[..., None]
            h = torch.where(is_mask, self.mask_embedding.to(h.dtype), h)
        return h

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- the planner-model interface the sampler calls (planners.llama_engine implements it too) -----------
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, valid: torch.Tensor, *, gen_start: int) -> KVCache:
        """K/V buffers for one denoising run over sequences shaped like `valid` (B, L) (gen_start: where the span
        starts; the torch model does not need it, engines that keep only final K/V do)."""
        w = self.embed_tokens.weight
        return KVCache.allocate(self.config, valid.shape[0], valid.shape[1], dtype=w.dtype, device=w.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """input_ids (B, Lq); attention_mask bool (B, 1, Lq, Lk), True = may attend, or None (full
        attention over the keys); position_ids (B, Lq), default `cache_start + arange(Lq)`.
        With a cache, Lk = cache.length and this chunk's K/V are written at [cache_start, cache_start + Lq)."""
        b, lq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + lq, device=input_ids.device).expand(b, lq)
        cos, sin = self.rotary(position_ids)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attention_mask, cache, i, cache_start)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, *, final: int | None = None, **kw) -> torch.Tensor:
        """Logits (B, Lq, V) in the model's dtype. Keyword arguments as `hidden_states`; `final` (positions before
        it hold final tokens) is for engines that keep only final K/V: this model recomputes what it is given."""
        h = self.hidden_states(input_ids, **kw)
        return h @ self.output_weight().t()


def _replace(c: BackboneConfig, **changes) -> BackboneConfig:
    d = c.to_dict()
    d.update(changes)
    return BackboneConfig.from_dict(d)


# ----------------------------------------------------------------------------- masks


def attention_mask(
    valid: torch.Tensor,
    *,
    pattern: AttentionPattern,
    gen_start: int,
    block_size: int = 0,
    query_positions: torch.Tensor | None = None,
    block_starts: list[int] | None = None,
) -> torch.Tensor:
    """Boolean attention mask (B, 1, Lq, Lk), True = query may attend to key.

    valid (B, Lk) bool marks real tokens (False = padding). Key columns index the whole sequence;
    `query_positions` (Lq,) selects which sequence positions the queries are (default: all).
    Patterns: "full" (bidirectional, LLaDA / Dream), "causal", "block_causal" — causal over the
    prompt (positions < gen_start), and inside the generation span bidirectional within a block of
    `block_size` and causal across blocks (Fast-dLLM v2). Every query may attend to itself, so padding
    rows never see an all-False row (which would give NaN through softmax).
    `block_starts` (block_causal only): the span's blocks start at these positions (the first at gen_start)
    instead of every block_size — a sampler with adaptive block ends; the last block runs to the end."""
    b, lk = valid.shape
    dev = valid.device
    keys = torch.arange(lk, device=dev)
    queries = keys if query_positions is None else query_positions.to(dev)
    if pattern == "full":
        allowed = torch.ones(len(queries), lk, dtype=torch.bool, device=dev)
    elif pattern == "causal":
        allowed = keys[None, :] <= queries[:, None]
    elif pattern == "block_causal":
        if block_size <= 0:
            raise ValueError("block_causal attention needs block_size > 0")

        starts = None if block_starts is None else torch.tensor(sorted(block_starts), device=dev)

        def block_of(p: torch.Tensor) -> torch.Tensor:
            # prompt positions are each their own block (causal); generation blocks of block_size (or as given)
            span = (p - gen_start) // block_size if starts is None else torch.searchsorted(starts, p, right=True) - 1
            return torch.where(p < gen_start, p - gen_start, span)

        allowed = (keys[None, :] <= queries[:, None]) | (
            (block_of(keys)[None, :] <= block_of(queries)[:, None]) & (queries[:, None] >= gen_start)
        )
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}; valid: {list(ATTENTION_PATTERNS)}")
    mask = allowed[None] & valid[:, None, :]  # (B, Lq, Lk)
    mask = mask | (queries[:, None] == keys[None, :])[None]
    return mask[:, None]


def position_ids_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Left padding: real tokens get positions 0.. in order; padding gets 0 (Dream: cumsum(m) - 1)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)
