"""Adapting an AR model into a block-diffusion planner (block diffusion as in Fast-dLLM v2, arXiv 2509.26328).

- `data`: generated prompt set (templates × topics, held-out topics) and self-distillation, through llama-cpp
  (`distill`, fastest on a CPU) or the native backbone in batches (`distill_torch`, for a GPU);
- `generate`: batched AR generation with the native backbone (left padding, KV cache, greedy or top-p);
- `carry`: the base GGUF cut into parts, and joined back, for a machine that receives a few tens of MiB at a time;
- `objective`: the two-copy block-diffusion SFT loss and its attention mask;
- `train`: the resumable LoRA training loop; `evaluate`: held-out metrics;
- `cli.main(argv)`: `python -m planners.adapt` (also `hybrid adapt`).
"""

from planners.adapt.cli import main

__all__ = ["main"]
