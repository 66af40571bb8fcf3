"""The realizer interface: an autoregressive model that streams an answer.

Every realizer (OpenAI-compatible server, embedded in-process model) exposes the
same async generator: `astream(messages, **sampling)` yields `TextDelta`s as the
model produces them and ends with exactly one `Completion` carrying the full
text, token usage and timings. `complete()` / `acomplete()` wrap it. This module
knows no transport and no model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


class RealizerError(RuntimeError):
    """A realizer failed. `where` names the server URL or model path involved."""

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(f"{message} ({where})" if where else message)
        self.where = where


class RealizerUnavailable(RealizerError):
    """The server cannot be reached (connection refused, DNS, closed port) or the model cannot be loaded."""


class RealizerTimeout(RealizerError):
    """The server did not answer within the configured timeout."""


class RealizerHTTPError(RealizerError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, *, where: str = "", status_code: int | None = None) -> None:
        super().__init__(message, where=where)
        self.status_code = status_code


@dataclass
class SamplingParams:
    """Sampling settings every realizer understands. `extra` holds backend-specific fields
    (vLLM: top_k, min_p, repetition_penalty, structured_outputs, ... sent through `extra_body`)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop_loops: bool = False  # embedded realizers: end the stream at a repetition loop (realizers/loops.py)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    source: Literal["server", "local"] = "server"  # "local": counted by us because the server sent none


@dataclass
class Timings:
    """Seconds, measured from the moment the request was sent (TTFT as `vllm bench serve` does:
    to the first chunk with non-empty content)."""

    ttft_s: float | None
    total_s: float
    tokens_per_s: float | None  # completion tokens / (total - ttft), None when < 2 tokens


@dataclass
class TextDelta:
    text: str


@dataclass
class Completion:
    text: str
    usage: Usage
    timings: Timings
    finish_reason: str | None = None  # "stop" | "length" | ...


StreamEvent = TextDelta | Completion


@runtime_checkable
class Realizer(Protocol):
    name: str

    def astream(
        self, messages: Sequence[Message], params: SamplingParams | None = None
    ) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


async def acomplete(
    realizer: Realizer, messages: Sequence[Message], params: SamplingParams | None = None
) -> Completion:
    """Run a realizer's stream to the end and return its `Completion`."""
    final: Completion | None = None
    async for ev in realizer.astream(messages, params):
        if isinstance(ev, Completion):
            final = ev
    if final is None:
        raise RealizerError(f"{realizer.name}: stream ended without a completion")
    return final


def complete(realizer: Realizer, messages: Sequence[Message], params: SamplingParams | None = None) -> Completion:
    """Blocking wrapper of `acomplete` (not for use inside a running event loop)."""
    return asyncio.run(acomplete(realizer, messages, params))


def make_timings(ttft_s: float | None, total_s: float, completion_tokens: int) -> Timings:
    """`Timings` with tokens/s as defined above: completion tokens / (total - ttft), None below 2 tokens."""
    tps = None
    if ttft_s is not None and completion_tokens >= 2 and total_s > ttft_s:
        tps = completion_tokens / (total_s - ttft_s)
    return Timings(ttft_s=ttft_s, total_s=total_s, tokens_per_s=tps)
