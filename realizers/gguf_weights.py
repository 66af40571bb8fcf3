"""GGUF -> transformers, dequantised: the one place the project spells out how a GGUF file becomes a model with
plain float weights and its tokenizer.

    load_gguf_model(path, dtype)   AutoModelForCausalLM with every weight dequantised to `dtype`
    load_gguf_tokenizer(path)      the tokenizer (and chat template) stored in the GGUF's metadata

Used by the planner's loaders (`planners.assets`, `planners.loading`), the transformers realizer and the local
vLLM preparation. What it does not know: which model the file holds or what the caller does with it. Imports
nothing from `hybrid` or `planners`; needs transformers >= 5 (`GgufConfig(dequantize=True)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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
