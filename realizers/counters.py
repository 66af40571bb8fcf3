"""Counters that several threads update: one lock, `add` and `peak`. The server's metrics and the counters of
the batching planner and the fallback realizer are all of this kind (the server passes its own object, with
their fields, to both). Knows nothing about what is counted."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class LockedCounters:
    """Subclass as a dataclass whose integer fields are the counters; every write goes through the lock."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add to counters, atomically."""
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def peak(self, name: str, value: int) -> None:
        """Raise a high-water mark to `value` if it is higher."""
        with self._lock:
            setattr(self, name, max(getattr(self, name), value))
