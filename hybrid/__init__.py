"""hybrid: a masked-diffusion planner drafts, temporal semantic entropy scores, an AR realizer streams.

Public names are imported lazily so `hybrid --help` and config errors stay fast."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HybridConfig": "hybrid.config",
    "ConfigError": "hybrid.config",
    "HybridState": "hybrid.state",
    "HybridContext": "hybrid.state",
    "build_graph": "hybrid.graph",
    "build_context": "hybrid.runtime",
    "SetupError": "hybrid.runtime",
    "nodes": "hybrid.nodes",
    "prompts": "hybrid.prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name in ("nodes", "prompts") else getattr(module, name)
