"""One long-lived thread for a model's work: loading, and every forward pass after it.

Why a thread of its own: torch and llama.cpp both parallelise with OpenMP (one libgomp in the process), and
libgomp keeps a pool of worker threads per thread that starts parallel regions. Each new calling thread adds a
pool; once the process has more OpenMP threads than cores, libgomp stops letting idle workers spin and puts them
to sleep after every region, so each later region (a llama.cpp decode, each torch op of the sampler) pays a
wake-up. Measured on a 2-core VM, the embedded planner's 48-token plan took 2.8-3.1 s in the thread that loaded
it and 3.7-4.8 s when each plan ran in a fresh thread, as `asyncio.to_thread` gives a first call. Keeping the
model on one thread keeps one pool and the fast path, whatever thread the caller is on.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs callables on one thread, started on first use. `call` blocks the caller until the callable returns
    and re-raises its exception; called from the model thread itself it runs inline (no deadlock on nested
    calls). The caller's context variables travel with the call."""

    def __init__(self, name: str = "model") -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        ctx = contextvars.copy_context()
        return self._pool.submit(ctx.run, self._enter, fn, args, kwargs).result()

    def _enter(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)

    def close(self) -> None:
        """Let the thread exit once its queued calls are done (idempotent)."""
        self._pool.shutdown(wait=False)
