"""Autoregressive realizers behind one streaming interface (`realizers.base`): an OpenAI-compatible server
client (vLLM in production) and the embedded in-process SmolLM2. Imports nothing from `hybrid`."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Realizer": "realizers.base",
    "SamplingParams": "realizers.base",
    "TextDelta": "realizers.base",
    "Completion": "realizers.base",
    "RealizerError": "realizers.base",
    "RealizerUnavailable": "realizers.base",
    "RealizerTimeout": "realizers.base",
    "RealizerHTTPError": "realizers.base",
    "complete": "realizers.base",
    "acomplete": "realizers.base",
    "OpenAIRealizer": "realizers.openai_compat",
    "FallbackRealizer": "realizers.fallback",
    "embedded_realizer": "realizers.embedded",
    "LlamaCppRealizer": "realizers.embedded",
    "TransformersRealizer": "realizers.embedded",
    "vllm_serve_command": "realizers.server",
    "wait_ready": "realizers.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'realizers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
