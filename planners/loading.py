"""Load planner backbones from local files, natively (no remote code).

Three layouts, detected from `config.json`:
- LLaDA (`model_type: "llada"`, tensors `model.transformer.blocks.N.q_proj` ...), fully bidirectional;
- Dream (`model_type: "Dream"`, Qwen2 tensor names with q/k/v biases), bidirectional with the shift;
- Llama-family AR models (`model_type: "llama"`, e.g. SmolLM2) from safetensors or a GGUF file,
  adapted to diffusion (mask embedding, shift, chosen attention pattern, optional LoRA adapter).

`save_checkpoint` writes the same layouts back (config.json + model.safetensors in the original
tensor names) — the tests build tiny random checkpoints with it and load them through `load_backbone`.
Nothing here samples or tokenizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from planners.model import AttentionPattern, BackboneConfig, DiffusionBackbone, LoRALinear

# --------------------------------------------------------------------------- tensor names

_LLADA_BLOCK = {
    "attn_norm": "input_norm",
    "q_proj": "attn.q_proj",
    "k_proj": "attn.k_proj",
    "v_proj": "attn.v_proj",
    "attn_out": "attn.o_proj",
    "ff_norm": "post_norm",
    "ff_proj": "mlp.gate_proj",  # LLaDA: act(ff_proj(x)) * up_proj(x) -> ff_out
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_HF_BLOCK = {
    "input_layernorm": "input_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "post_attention_layernorm": "post_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def _ours_from_llada(name: str) -> str | None:
    fixed = {
        "model.transformer.wte.weight": "embed_tokens.weight",
        "model.transformer.ln_f.weight": "norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LLADA_BLOCK:
        return f"layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def _ours_from_hf(name: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if name in fixed:
        return fixed[name]
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)", name)
    if m and m.group(2) in _HF_BLOCK:
        return f"layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _theirs(name: str, arch: str) -> str:
    """Our tensor name -> the checkpoint's tensor name (for save_checkpoint)."""
    if arch == "llada":
        fixed = {
            "embed_tokens.weight": "model.transformer.wte.weight",
            "norm.weight": "model.transformer.ln_f.weight",
            "lm_head.weight": "model.transformer.ff_out.weight",
        }
        block, prefix = _invert(_LLADA_BLOCK), "model.transformer.blocks"
    else:
        fixed = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        fixed["lm_head.weight"] = "lm_head.weight"
        block, prefix = _invert(_HF_BLOCK), "model.layers"
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.([\w.]+)\.(weight|bias)", name)
    if not m or m.group(2) not in block:
        raise KeyError(name)
    return f"{prefix}.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"


# --------------------------------------------------------------------------- configs


def detect_arch(hf_config: dict[str, Any]) -> str:
    mt = str(hf_config.get("model_type", "")).lower()
    archs = " ".join(hf_config.get("architectures") or []).lower()
    if mt == "llada" or "llada" in archs:
        return "llada"
    if mt == "dream" or "dream" in archs:
        return "dream"
    if mt in ("llama", "qwen2", "mistral") or "llama" in archs:
        return "llama"
    raise ValueError(
        f"unsupported model_type {hf_config.get('model_type')!r} (architectures {hf_config.get('architectures')}); "
        "supported: llada, Dream, llama (and Llama-compatible AR checkpoints)"
    )


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _rope_theta(d: dict[str, Any]) -> float:
    # transformers >= 5 keeps it in rope_parameters; older configs at top level
    rp = d.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"rope scaling {rp.get('rope_type')!r} is not supported by the native backbones")
    return float(rp.get("rope_theta") or d.get("rope_theta") or 10000.0)


def config_from_hf(d: dict[str, Any], **overrides: Any) -> BackboneConfig:
    """Translate a checkpoint's config.json into ours. `overrides` set adaptation fields
    (mask_token_id, attention, block_size, shift, learned_mask_embedding, lora_rank ...)."""
    arch = detect_arch(d)
    if arch == "llada":
        if d.get("include_bias") or d.get("include_qkv_bias"):
            raise ValueError("LLaDA checkpoints with biases are not supported (include_bias / include_qkv_bias)")
        c: dict[str, Any] = dict(
            arch="llada",
            vocab_size=int(d.get("embedding_size") or d["vocab_size"]),
            hidden_size=int(d["d_model"]),
            intermediate_size=int(d["mlp_hidden_size"]),
            num_layers=int(d["n_layers"]),
            num_heads=int(d["n_heads"]),
            num_kv_heads=int(d.get("n_kv_heads") or d["n_heads"]),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_sequence_length", 4096)),
            tie_word_embeddings=bool(d.get("weight_tying", False)),
            mask_token_id=int(d.get("mask_token_id", 126336)),
            eos_token_id=int(_first_id(d.get("eos_token_id")) or 126081),
            pad_token_id=_first_id(d.get("pad_token_id")),
            bos_token_id=_first_id(d.get("bos_token_id")),
            extra_eos_ids=tuple(int(x) for x in d.get("eot_token_ids", d.get("extra_eos_token_ids", [])) or []),
            shift=False,
            attention="full",
        )
    else:
        if arch == "dream" and "mask_token_id" not in d and "mask_token_id" not in overrides:
            raise ValueError("Dream config.json has no mask_token_id")
        c = dict(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=d.get("head_dim"),
            rope_theta=_rope_theta(d),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "dream" or str(d.get("model_type", "")).lower() == "qwen2",
            mask_token_id=int(d.get("mask_token_id", overrides.get("mask_token_id", -1))),
            eos_token_id=int(_first_id(d.get("eos_token_id")) if d.get("eos_token_id") is not None else 0),
            pad_token_id=_first_id(d.get("pad_token_id")),
            bos_token_id=_first_id(d.get("bos_token_id")),
            shift=True,
            attention="full" if arch == "dream" else "block_causal",
            block_size=0 if arch == "dream" else 8,
            learned_mask_embedding=arch == "llama",
        )
        if c["head_dim"] is not None:
            c["head_dim"] = int(c["head_dim"])
    c.update(overrides)
    return BackboneConfig.from_dict(c)


def hf_config_from_ours(c: BackboneConfig) -> dict[str, Any]:
    """The config.json a checkpoint of this architecture carries (inverse of config_from_hf)."""
    if c.arch == "llada":
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": c.hidden_size,
            "n_heads": c.num_heads,
            "n_kv_heads": c.num_kv_heads,
            "n_layers": c.num_layers,
            "mlp_hidden_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "embedding_size": c.vocab_size,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "max_sequence_length": c.max_position_embeddings,
            "weight_tying": c.tie_word_embeddings,
            "include_bias": False,
            "include_qkv_bias": False,
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "rope": True,
            "mask_token_id": c.mask_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "bos_token_id": c.bos_token_id,
        }
    d = {
        "architectures": ["DreamModel"] if c.arch == "dream" else ["LlamaForCausalLM"],
        "model_type": "Dream" if c.arch == "dream" else "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "hidden_act": "silu",
    }
    if c.head_dim:
        d["head_dim"] = c.head_dim
    if c.arch == "dream":
        d["mask_token_id"] = c.mask_token_id
    return d


# --------------------------------------------------------------------------- load / save


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_hf_config(r: Any, gguf_file: Path) -> dict[str, Any]:
    """A llama-architecture GGUF's metadata (open `GGUFReader` `r`) as a Hugging Face config dict: from its
    key-value fields and tensor shapes alone, no tensor data read."""

    def meta(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_file}: GGUF architecture {arch!r}; the native reader reads 'llama' GGUFs")
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # ggml order: the row length first
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(meta("llama.vocab_size", shapes["token_embd.weight"][-1])),
        "hidden_size": int(meta("llama.embedding_length")),
        "intermediate_size": int(meta("llama.feed_forward_length")),
        "num_hidden_layers": int(meta("llama.block_count")),
        "num_attention_heads": int(meta("llama.attention.head_count")),
        "num_key_value_heads": int(meta("llama.attention.head_count_kv")),
        "rope_theta": float(meta("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(meta("llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("llama.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
    }


def _state_from_gguf(gguf_file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a llama-architecture GGUF with the `gguf` package alone: its metadata as a Hugging Face config dict,
    its tensors dequantised to float32 under Hugging Face names (q / k rows back in rotate-half order).
    No transformers: the same code reads it wherever `gguf` and numpy are installed."""
    from gguf import GGUFReader

    from planners.export_gguf import _unpermute, read_tensors

    r = GGUFReader(str(gguf_file))
    hf = _gguf_hf_config(r, gguf_file)
    n_head, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    for name, a in read_tensors(gguf_file, reader=r).items():
        w = torch.from_numpy(a)
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif name == "output.weight":
            state["lm_head.weight"] = w
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
            if not m or m.group(2) not in _GGUF_BLOCK:
                continue  # e.g. rope_freqs: derived from the config
            if m.group(2) in ("attn_q", "attn_k"):
                w = _unpermute(w, n_head if m.group(2) == "attn_q" else n_kv)
            state[f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"] = w
    return hf, state


def load_backbone(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention: AttentionPattern | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = False,
    **overrides: Any,
) -> DiffusionBackbone:
    """Load a planner backbone from a local checkpoint directory (config.json + safetensors) or a
    `.gguf` file. For AR (Llama-family) checkpoints, `mask_token_id` picks the vocabulary entry used as
    the mask (default: the config's, else an error), `attention`/`block_size` the attention pattern,
    and `adapter` a `.safetensors` file of trained adapter weights (LoRA + mask embedding) whose
    sidecar `.json` holds the adaptation config. `merge_adapter=True` folds the LoRA into the base weights
    (`merge_lora`): an inference model whose forward pays no adapter matmuls and cannot switch it off."""
    path, config, lora, adapter, state, mapper = _resolve(
        path, attention, block_size, mask_token_id, adapter, overrides, read_weights=True
    )
    with torch.device("meta"):
        model = DiffusionBackbone(config)
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        mapped = mapper(name)
        if mapped is not None:
            ours[mapped] = tensor
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    missing = [k for k, _ in model.state_dict().items() if k not in ours and k != "mask_embedding"]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model = model.to_empty(device=device)
    model.rotary.__init__(config.dim_head, config.rope_theta)  # buffers are not in checkpoints
    if model.mask_embedding is not None:
        ours["mask_embedding"] = ours["embed_tokens.weight"].float().mean(0)  # init: mean embedding
    model.load_state_dict(ours, strict=True)
    model = model.to(device=device, dtype=dtype)
    if lora.get("lora_rank"):
        model.add_lora(int(lora["lora_rank"]), float(lora.get("lora_alpha", 16.0)), tuple(lora.get("lora_targets", ())))
    if adapter is not None:
        load_adapter(model, adapter)
    if merge_adapter:
        merge_lora(model)
    return model.eval()


def backbone_config(
    path: str | os.PathLike,
    *,
    attention: AttentionPattern | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = False,
    **overrides: Any,
) -> BackboneConfig:
    """The config of the model `load_backbone` returns for the same arguments, without reading a weight or
    building a model (a meta-device model would cost seconds the first time: torch imports its compiler for the
    meta kernels): from config.json or the GGUF's metadata and the adapter's sidecar. What a caller needs when a
    cached export of those weights already exists (`planners.llama_engine.load_engine`)."""
    _, config, lora, _, _, _ = _resolve(path, attention, block_size, mask_token_id, adapter, overrides)
    if lora.get("lora_rank"):  # what load_backbone's add_lora and merge_lora do to the config
        targets = tuple(lora.get("lora_targets", ()))
        rank = 0 if merge_adapter and targets else int(lora["lora_rank"])
        alpha = float(lora.get("lora_alpha", 16.0))
        config = dataclasses.replace(config, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    return config


def _resolve(
    path: str | os.PathLike,
    attention: AttentionPattern | None,
    block_size: int | None,
    mask_token_id: int | None,
    adapter: str | os.PathLike | None,
    overrides: dict[str, Any],
    *,
    read_weights: bool = False,
) -> tuple[Path, BackboneConfig, dict[str, Any], Path | None, dict[str, torch.Tensor], Any]:
    """What `load_backbone` and `backbone_config` share: the checked paths, the config before any LoRA (with the
    adapter's sidecar and the overrides applied), the LoRA settings, and with `read_weights` the checkpoint's
    tensors and the mapper of their names (else an empty dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"planner model path does not exist: {path}")
    overrides = dict(overrides)
    if attention is not None:
        overrides["attention"] = attention
    if block_size is not None:
        overrides["block_size"] = block_size
    if mask_token_id is not None:
        overrides["mask_token_id"] = mask_token_id
    if adapter is not None:
        adapter = Path(adapter)
        sidecar = adapter.with_suffix(".json")
        if not adapter.exists():
            raise FileNotFoundError(f"adapter weights not found: {adapter}")
        if sidecar.exists():
            overrides = {**json.loads(sidecar.read_text()).get("backbone", {}), **overrides}

    state: dict[str, torch.Tensor] = {}
    if path.is_file() and path.suffix == ".gguf":
        if read_weights:
            hf, state = _state_from_gguf(path)
        else:
            from gguf import GGUFReader

            hf = _gguf_hf_config(GGUFReader(str(path)), path)
        mapper = _ours_from_hf
    else:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} has no config.json (expected a checkpoint directory or a .gguf file)")
        hf = json.loads(cfg_file.read_text())
        if read_weights:
            state = _read_safetensors_dir(path)
        mapper = _ours_from_llada if detect_arch(hf) == "llada" else _ours_from_hf
    if detect_arch(hf) == "llama" and "mask_token_id" not in overrides and "mask_token_id" not in hf:
        raise ValueError(f"{path}: an AR checkpoint needs mask_token_id (an unused vocabulary entry) to be adapted")
    lora = {k: overrides.pop(k) for k in ("lora_rank", "lora_alpha", "lora_targets") if k in overrides}
    return path, config_from_hf(hf, **overrides), lora, adapter, state, mapper


@torch.no_grad()
def merge_lora(model: DiffusionBackbone) -> DiffusionBackbone:
    """Fold every LoRA adapter into its base linear, in place: W <- W + (alpha / r) B A, computed in float32
    and cast back to the weight's dtype; each `LoRALinear` is replaced by its (now merged) base `nn.Linear`.

    A forward then costs what the base model costs (the unmerged path adds two thin matmuls per projection,
    7 x 30 of them for SmolLM2-135M). Adapters that were switched off are dropped, not merged. Afterwards the
    model has no adapter to train or to switch off (`set_adapter_enabled(False)` raises), and
    `config.lora_rank` is 0; load with `merge_adapter=False` to keep it (training, adapter-off scoring).
    Returns the model."""
    merged = 0
    for block in model.layers:
        for parent in block.children():
            for name, child in list(parent.named_children()):
                if not isinstance(child, LoRALinear):
                    continue
                base = child.base
                if child.enabled:
                    delta = child.scale * (child.lora_b.float() @ child.lora_a.float())  # (out, in)
                    base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
                setattr(parent, name, base)
                merged += 1
    if merged:
        model.config = BackboneConfig.from_dict({**model.config.to_dict(), "lora_rank": 0})
        model.lora_merged = True
    return model


def load_adapter(model: DiffusionBackbone, adapter: str | os.PathLike) -> None:
    weights = load_file(str(adapter))
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise ValueError(f"adapter {adapter} has tensors the model lacks: {unknown[:5]} (LoRA rank/targets mismatch?)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=False)


def save_adapter(model: DiffusionBackbone, path: str | os.PathLike, *, meta: dict[str, Any] | None = None) -> None:
    """Write the trained adapter (LoRA + mask embedding) as safetensors + a sidecar JSON config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in model.adapter_state_dict().items()}, str(path))
    c = model.config
    backbone = {
        k: getattr(c, k)
        for k in (
            "mask_token_id",
            "attention",
            "block_size",
            "shift",
            "learned_mask_embedding",
            "lora_rank",
            "lora_alpha",
        )
    }
    backbone["lora_targets"] = list(c.lora_targets)
    path.with_suffix(".json").write_text(json.dumps({"backbone": backbone, **(meta or {})}, indent=2))


def save_checkpoint(model: DiffusionBackbone, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors in the architecture's original layout and tensor names."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    c = model.config
    (d / "config.json").write_text(json.dumps(hf_config_from_ours(c), indent=2))
    state = {}
    for k, v in model.state_dict().items():
        if k == "mask_embedding" or ".lora_" in k:
            continue
        k = k.replace(".base.", ".")  # LoRA-wrapped linears
        state[_theirs(k, c.arch)] = v.contiguous()
    save_file(state, str(d / "model.safetensors"))
    return d
