"""Adapting an AR model into a block-diffusion planner (block diffusion as in Fast-dLLM v2, arXiv 2509.26328).

- `data`: generated prompt set (templates × topics, held-out topics) and self-distillation through llama-cpp;
- `objective`: the two-copy block-diffusion SFT loss and its attention mask;
- `train`: the resumable LoRA training loop; `evaluate`: held-out metrics;
- `cli.main(argv)`: `python -m planners.adapt` (also `hybrid adapt`).
"""

from planners.adapt.cli import main

__all__ = ["main"]
