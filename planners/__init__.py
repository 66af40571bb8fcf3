"""Diffusion planning: native dLLM backbones, the masked-diffusion sampler, trajectories, temporal semantic
entropy, revision and adaptation. Token ids in the sampler; text only in `Planner`. Imports nothing from
`hybrid`. Public names load lazily (torch is heavy)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Planner": "planners.planner",
    "PlanResult": "planners.planner",
    "SamplerConfig": "planners.sampler",
    "sample": "planners.sampler",
    "denoise": "planners.sampler",
    "Trajectory": "planners.trajectory",
    "load_backbone": "planners.loading",
    "BackboneConfig": "planners.model",
    "DiffusionBackbone": "planners.model",
    "score_trajectory": "planners.tse",
    "TSEConfig": "planners.tse",
    "BatchingPlanner": "planners.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'planners' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
