"""GGUF -> transformers, dequantised: the one place the project spells out how a GGUF file becomes a model with
plain float weights and its tokenizer.

    load_gguf_model(path, dtype)   AutoModelForCausalLM with every weight dequantised to `dtype`
    load_gguf_tokenizer(path)      the tokenizer (and chat template) stored in the GGUF's metadata
    gguf_file_type(path)           the file's weight type ("q4_1", "q8_0", ...), read from its header alone

Used by the planner's loaders (`planners.assets`, `planners.loading`), the transformers realizer and the local
vLLM preparation. What it does not know: which model the file holds or what the caller does with it. Imports
nothing from `hybrid` or `planners`; needs transformers >= 5 (`GgufConfig(dequantize=True)`) for the loaders
(`gguf_file_type` needs nothing: `gguf.GGUFReader` parses every tensor and array first, seconds on a busy CPU).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

# llama.cpp's `llama_ftype` (general.file_type) -> the names this project uses for weight types
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 15: "q4_k_m", 17: "q5_k_m"}
FILE_TYPES |= {18: "q6_k", 25: "iq4_nl", 32: "bf16"}
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUF types


def load_gguf_model(path: str | os.PathLike, dtype: Any = None) -> Any:
    """A causal LM from `path` with its weights dequantised to `dtype` (default float32). `dequantize=True` is
    explicit: transformers 5.24 otherwise tries to keep GGUF weights quantised, and such a model refuses
    `save_pretrained`. The model carries a `quantization_config` in its config; callers that save it drop it."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        quantization_config=GgufConfig(gguf_file=str(path), dequantize=True),
        dtype=dtype or torch.float32,
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored in the GGUF's metadata (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _skip_value(f: BinaryIO, vtype: int) -> Any:
    """Read one GGUF metadata value of `vtype` (scalars are returned; strings and arrays are read past)."""
    if vtype in _SCALAR:
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == 8:  # string: u64 length + bytes
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, os.SEEK_CUR)
        return None
    if vtype == 9:  # array: u32 element type, u64 count, elements
        etype, n = struct.unpack("<IQ", f.read(12))
        if etype in _SCALAR:
            f.seek(n * struct.calcsize("<" + _SCALAR[etype]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _skip_value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_file_type(path: str | os.PathLike) -> str:
    """The weight type a GGUF declares (`general.file_type`: "q4_1", "q8_0", "f16", ...; "ftype N" for a type this
    project has no name for; "unknown" when the key is absent), read from the header without loading tensors."""
    with open(path, "rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF file of version >= 2")
        _, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", f.read(4))
            value = _skip_value(f, vtype)
            if key == "general.file_type":
                return FILE_TYPES.get(int(value), f"ftype {value}")
    return "unknown"
