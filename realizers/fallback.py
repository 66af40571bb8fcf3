"""A realizer that falls back to a second realizer when the first fails before its first token.

`FallbackRealizer(primary, fallback)` streams from `primary`; on a `RealizerError` before any text went out it
streams the same request from `fallback` and skips the primary for `retry_after_s`. A failure after tokens went
out is raised: the caller already has part of the answer.

What it does not know: which models or servers stand behind either realizer, or where its counter is reported
— `metrics` is any object with a `fallbacks` field and an `add` method (`FallbackStats` by default). Imports
nothing from `hybrid`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from realizers.base import RealizerError, SamplingParams, StreamEvent, TextDelta
from realizers.counters import LockedCounters

log = logging.getLogger(__name__)


@dataclass
class FallbackStats(LockedCounters):
    """The counter a `FallbackRealizer` updates through `add`, under a lock (the server passes its own metrics
    object, with this field and method)."""

    fallbacks: int = 0  # requests the fallback realizer answered


class FallbackRealizer:
    """Streams from `primary`; if it fails before its first token, streams the same request from `fallback`
    and leaves the primary alone for `retry_after_s` (requests go straight to the fallback meanwhile). A
    failure after tokens went out is raised: the client already has part of the answer."""

    def __init__(self, primary: Any, fallback: Any, *, retry_after_s: float = 5.0, metrics: Any = None):
        self.primary, self.fallback = primary, fallback
        self.retry_after_s = retry_after_s
        self.metrics = metrics or FallbackStats()  # any object with a `fallbacks` field and `add`
        self._down_until = 0.0
        self.name = f"{primary.name} (fallback: {fallback.name})"

    async def astream(self, messages, params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
        if time.monotonic() >= self._down_until:
            started = False
            try:
                async for ev in self.primary.astream(messages, params):
                    if isinstance(ev, TextDelta) and ev.text:
                        started = True
                    yield ev
                return
            except RealizerError as e:
                if started:
                    raise
                self._down_until = time.monotonic() + self.retry_after_s
                log.warning("primary realizer failed (%s); using the fallback for %.0f s", e, self.retry_after_s)
        self.metrics.add(fallbacks=1)
        async for ev in self.fallback.astream(messages, params):
            yield ev

    async def aclose(self) -> None:
        for r in (self.primary, self.fallback):
            await r.aclose()
