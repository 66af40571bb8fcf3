"""Export an adapted Llama-family planner to a GGUF file that llama.cpp runs (`planners.llama_engine`).

What goes in:
- the backbone's weights with the LoRA adapter merged (W + (alpha / r) B A, arXiv 2106.09685 §4.1);
- the learned mask embedding written into the mask token's row of `token_embd`. Tied models get a separate
  `output` matrix (the original embeddings), so every logit equals the torch model's, the mask column included;
- q / k rows permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved rope (the inverse of
  what transformers does when it reads a GGUF: `convert_hf_to_gguf.py`'s `LlamaModel.permute`);
- tokenizer and chat-template metadata copied from a reference GGUF (the packaged SmolLM2 file);
- the backbone config as JSON under `hybrid.backbone`, so the engine needs no other file.

Weight types: `f32` (exactness tests) and `f16` are written here; quantised types (`q8_0`, `q4_0`, `q4_1`,
`q4_k_m`, ...) are made from the f32 file by llama.cpp's own quantiser (`llama_model_quantize`).
`cached_export` keeps the files in the cache directory, keyed by what they were made from.

What it does not know: how the file is run (that is `planners.llama_engine`), or sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from planners.model import BackboneConfig, DiffusionBackbone, LoRALinear

WeightType = Literal["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"]
WEIGHT_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k")
_QUANT_FTYPES = {  # llama_ftype values (llama.h)
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
}
BACKBONE_KEY = "hybrid.backbone"
EXPORT_VERSION = 1  # bump when the file layout changes: invalidates cached exports


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half (HF) rows -> llama.cpp's interleaved rope rows, per head: (n_head * D, H) -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rope rows -> Hugging Face's rotate-half rows, per head: the inverse of `_permute`
    (what transformers does when it reads a GGUF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _merged(lin: torch.nn.Module) -> torch.Tensor:
    """The effective weight of a (LoRA-wrapped) linear layer, float32: W + scale * B @ A if the adapter is on."""
    if isinstance(lin, LoRALinear):
        w = lin.base.weight.detach().float()
        if lin.enabled:
            w = w + lin.scale * (lin.lora_b.detach().float() @ lin.lora_a.detach().float())
        return w
    return lin.weight.detach().float()


def gguf_tensors(model: DiffusionBackbone) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor (Hugging Face shapes: (out, in)) for llama.cpp's `llama` arch."""
    c = model.config
    if c.arch != "llama" or c.qkv_bias:
        raise ValueError(f"GGUF export supports Llama-family backbones without q/k/v biases, got arch={c.arch!r}")
    emb = model.embed_tokens.weight.detach().float()
    out: dict[str, torch.Tensor] = {}
    token_embd = emb.clone()
    if model.mask_embedding is not None:
        token_embd[c.mask_token_id] = model.mask_embedding.detach().float()
    out["token_embd.weight"] = token_embd
    head = emb if model.lm_head is None else model.lm_head.weight.detach().float()
    if model.lm_head is not None or model.mask_embedding is not None:
        out["output.weight"] = head.clone()  # untied: the mask row of token_embd must not change the logits
    out["output_norm.weight"] = model.norm.weight.detach().float()
    for i, blk in enumerate(model.layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = blk.input_norm.weight.detach().float()
        out[p + "attn_q.weight"] = _permute(_merged(blk.attn.q_proj), c.num_heads)
        out[p + "attn_k.weight"] = _permute(_merged(blk.attn.k_proj), c.num_kv_heads)
        out[p + "attn_v.weight"] = _merged(blk.attn.v_proj)
        out[p + "attn_output.weight"] = _merged(blk.attn.o_proj)
        out[p + "ffn_norm.weight"] = blk.post_norm.weight.detach().float()
        out[p + "ffn_gate.weight"] = _merged(blk.mlp.gate_proj)
        out[p + "ffn_up.weight"] = _merged(blk.mlp.up_proj)
        out[p + "ffn_down.weight"] = _merged(blk.mlp.down_proj)
    return out


def _copy_tokenizer(writer, reference: Path) -> None:
    """Copy `tokenizer.*` key/values (vocabulary, merges, special ids, chat template) from a reference GGUF."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(reference))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_gguf(
    model: DiffusionBackbone, path: str | os.PathLike, *, tokenizer_gguf: str | os.PathLike, name: str = "planner"
) -> Path:
    """Write `model` as an f32 GGUF of llama.cpp's `llama` architecture (see the module docstring)."""
    from gguf import GGUFWriter, LlamaFileType

    c = model.config
    path = Path(path)
    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.dim_head)
    w.add_key_length(c.dim_head)
    w.add_value_length(c.dim_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_string(BACKBONE_KEY, json.dumps(c.to_dict()))
    _copy_tokenizer(w, Path(tokenizer_gguf))
    for tname, t in gguf_tensors(model).items():
        w.add_tensor(tname, np.ascontiguousarray(t.numpy().astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(src: str | os.PathLike, dst: str | os.PathLike, weight_type: str, *, threads: int = 1) -> Path:
    """llama.cpp's quantiser: an f32 GGUF -> `weight_type` (its mixes: e.g. q4_k_m keeps some tensors at q6_k)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama-cpp-python's log filter (as `Llama(verbose=False)` sets it): no per-tensor lines
    if weight_type not in _QUANT_FTYPES:
        raise ValueError(f"weight_type={weight_type!r}: quantised types are {sorted(_QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _QUANT_FTYPES[weight_type]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({weight_type}) failed with status {rc}")
    return Path(dst)


def export(
    model: DiffusionBackbone,
    path: str | os.PathLike,
    *,
    weight_type: str = "f32",
    tokenizer_gguf: str | os.PathLike,
    name: str = "planner",
) -> Path:
    """`model` -> a GGUF of `weight_type` at `path` (written atomically)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type={weight_type!r} is not valid; choose one of: {', '.join(WEIGHT_TYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".export-"))
    try:
        f32 = write_gguf(model, tmp / "f32.gguf", tokenizer_gguf=tokenizer_gguf, name=name)
        made = f32 if weight_type == "f32" else quantize(f32, tmp / f"{weight_type}.gguf", weight_type)
        made.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_backbone_config(path: str | os.PathLike) -> BackboneConfig:
    """The `BackboneConfig` an exported GGUF carries."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(BACKBONE_KEY)
    if field is None:
        raise ValueError(f"{path} has no {BACKBONE_KEY} metadata: not a planner exported by planners.export_gguf")
    return BackboneConfig.from_dict(json.loads(field.contents()))


def read_tensors(path: str | os.PathLike, *, reader=None) -> dict[str, np.ndarray]:
    """Tensor name -> float32 array in Hugging Face shape (dequantised). `reader`: a `gguf.GGUFReader` already
    open on `path` (its metadata is read too), else one is opened here."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in (reader or GGUFReader(str(path))).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- cache


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_key(*files: str | os.PathLike | None, extra: str = "") -> str:
    """A short key for what an export was made from: the files' names, sizes and (small files) contents."""
    h = hashlib.sha256(f"v{EXPORT_VERSION}|{extra}".encode())
    paths: list[Path] = []
    for f in files:
        if f is not None:
            p = Path(f)
            paths += sorted(x for x in p.iterdir() if x.suffix in (".json", ".safetensors")) if p.is_dir() else [p]
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
        h.update((file_digest(p) if st.st_size < (64 << 20) else str(int(st.st_mtime))).encode())
    return h.hexdigest()[:16]


def cached_export(
    build_model,
    *,
    key: str,
    weight_type: str,
    tokenizer_gguf: str | os.PathLike,
    name: str = "planner",
    progress=lambda _m: None,
) -> Path:
    """The GGUF for (key, weight_type) in the cache directory, exported from `build_model()` on first use."""
    from planners.assets import cache_dir

    target = cache_dir() / "planner-gguf" / f"{name}-{key}-{weight_type}.gguf"
    if target.exists():
        return target
    progress(f"exporting the planner to GGUF ({weight_type}) in {target.parent} (once) ...")
    with torch.no_grad():
        export(build_model(), target, weight_type=weight_type, tokenizer_gguf=tokenizer_gguf, name=name)
    return target
