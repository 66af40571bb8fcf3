"""GGUF dequantisation: the planner's native GGUF reader (`planners.loading`, the gguf package alone) and the
cached Hugging Face directory of `planners.assets` (transformers' reader, `realizers.gguf_weights`, which the
transformers realizer and the local vLLM preparation use too) hold identical weights, from the packaged SmolLM2
GGUF."""

from __future__ import annotations

import torch


def test_every_loader_gets_the_same_dequantised_weights(smol_dir, smol_tokenizer):
    from safetensors.torch import load_file

    from planners.loading import _state_from_gguf
    from realizers.embedded import packaged_gguf_path
    from realizers.gguf_weights import load_gguf_tokenizer

    gguf = packaged_gguf_path()
    hf, state = _state_from_gguf(gguf)  # planners.loading: the gguf package's dequantisation
    cached = load_file(str(smol_dir / "model.safetensors"))  # planners.assets -> load_gguf_model, saved
    assert hf["model_type"] == "llama" and cached
    for name, tensor in cached.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    tok = load_gguf_tokenizer(gguf)
    assert tok.chat_template and tok.eos_token_id is not None
    assert tok("Hello, tea?").input_ids == smol_tokenizer("Hello, tea?").input_ids  # the cached directory's
