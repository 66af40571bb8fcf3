"""A micro-batching front for `planners.planner.Planner`: one worker thread makes every model call, and
concurrent `plan` / `redraw` calls with the same sampler settings are denoised together in one batch.

Callers (threads) block until their batch is done. A call queued on behalf of a request can be dropped
before it runs: a caller sets `_REQUEST` to a `_Handle` (worker threads started by `asyncio.to_thread`
inherit it) and sets `handle.cancelled` when the request goes away; the queued call then raises
`PlanCancelled`. Batched rows get the trajectory and NFE a solo run would have had (`_solo_trajectory`).

What it does not know: who its callers are (an HTTP server, a benchmark), what a request is beyond a handle
with an id and a cancelled flag, or where its counters are reported — `metrics` is any object with the
`BatchStats` fields and its `add` / `peak` methods. Imports nothing from `hybrid`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from realizers.counters import LockedCounters


@dataclass
class BatchStats(LockedCounters):
    """The counters a `BatchingPlanner` updates, through `add` / `peak` under a lock (the worker thread writes
    them while others read). The server passes its own metrics object, with these fields and methods."""

    plan_batches: int = 0
    plan_rows: int = 0
    plan_max_batch: int = 0
    plans_skipped: int = 0  # queued planner calls dropped because their request was cancelled


@dataclass
class _Handle:
    """One request, as seen from worker threads (callers reach the planner through `asyncio.to_thread`, which
    copies the `_REQUEST` context variable)."""

    rid: str
    cancelled: threading.Event = field(default_factory=threading.Event)


_REQUEST: contextvars.ContextVar[_Handle | None] = contextvars.ContextVar("planner_request", default=None)


class PlanCancelled(RuntimeError):
    """The request that queued this planner call was cancelled before the call ran."""


@dataclass
class _Job:
    """One planner call: denoise `x = [prompt | span]`, where span is all masks (plan) or a previous plan with
    some positions masked again (redraw). Jobs with equal `key` can share a batch."""

    kind: str  # "plan" | "redraw"
    config: Any  # SamplerConfig
    prompt_ids: list[int]
    span: list[int] | None = None  # redraw: the previous span with the positions to redraw set to the mask id
    on_block: Any = None  # plan: `Planner.plan`'s progress callback (PlanProgress per finished block), if any
    handle: _Handle | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def key(self) -> tuple:
        return (self.kind, self.config, len(self.span) if self.span is not None else None)


class BatchingPlanner:
    """The `Planner` surface callers use (plan, redraw, encode, decode, model, sampler), with every
    model call made by one worker thread, FIFO, concurrent `plan` calls with equal sampler settings batched.

    `plan` / `redraw` block their (worker-pool) caller until their batch is done. The worker takes the oldest
    queued call, waits `window_s` after its arrival for company, and batches it with every later queued call of
    the same kind and SamplerConfig (up to `max_batch`): plans through `sampler.sample`, redraws through
    `sampler.infill` (prompts + partly masked spans), the same computation `Planner.plan` / `Planner.redraw`
    do for one row. Tokenizer calls from other threads (TSE scoring decodes) take a lock: fast tokenizers are
    not safe to share between threads."""

    def __init__(self, planner: Any, *, max_batch: int = 16, window_s: float = 0.005, metrics: Any = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.planner = planner
        self.max_batch, self.window_s = max_batch, window_s
        self.metrics = metrics or BatchStats()  # any object with BatchStats' fields, add and peak
        self._tok = threading.RLock()
        self._cv = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="planner-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the Planner surface
    @property
    def model(self):
        return self.planner.model

    @property
    def sampler(self):
        return self.planner.sampler

    @property
    def tokenizer(self):
        return self.planner.tokenizer

    @property
    def name(self) -> str:
        return self.planner.name

    @property
    def context_length(self) -> int:
        return self.planner.context_length

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def encode(self, prompt, *, system: str | None = None) -> list[int]:
        with self._tok:
            return self.planner.encode(prompt, system=system)

    def decode(self, ids) -> str:
        with self._tok:
            return self.planner.decode(ids)

    def plan(self, prompt, *, system: str | None = None, config=None, on_block=None, **overrides):
        """As `Planner.plan`, batched: `on_block` gets this row's finished blocks, called from the worker thread
        in a copy of the caller's context (context variables read as in the caller, as they do for a solo plan)."""
        if on_block is not None:
            caller, report = contextvars.copy_context(), on_block
            on_block = lambda progress: caller.run(report, progress)  # noqa: E731
        cfg = config or self.planner.sampler
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        ids = self.encode(prompt, system=system)
        self.planner.check_prompt(ids, cfg.gen_length)
        return self._submit(_Job("plan", cfg, ids, on_block=on_block))

    def redraw(self, previous, positions, *, config=None):
        """Remask `positions` (relative to the span) of a previous PlanResult and denoise them again."""
        from planners.planner import redraw_config

        span = list(previous.span or previous.tokens)
        cfg = redraw_config(config or self.planner.sampler, len(span))  # exactly as Planner.redraw
        mask_id = self.planner.model.config.mask_token_id
        for p in positions:
            if not 0 <= p < len(span):
                raise IndexError(f"remask position {p} outside the generation span of {len(span)}")
            span[p] = mask_id
        return self._submit(_Job("redraw", cfg, list(previous.prompt_ids), span=span))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._jobs = list(self._jobs), collections.deque()
            self._cv.notify_all()
        for j in pending:
            j.future.set_exception(RuntimeError("the planner queue was closed (server shutting down)"))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ queue
    def _submit(self, job: _Job):
        job.handle = _REQUEST.get()
        with self._cv:
            if self._closed:
                raise RuntimeError("the planner queue is closed (server shutting down)")
            self._jobs.append(job)
            self._cv.notify()
        return job.future.result()

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            first = self._jobs[0]
        wait = first.enqueued + self.window_s - time.monotonic()
        if wait > 0 and self.max_batch > 1:
            time.sleep(wait)  # let a burst of requests arrive together
        with self._cv:
            live: collections.deque[_Job] = collections.deque()
            for j in self._jobs:
                if j.handle is not None and j.handle.cancelled.is_set():
                    j.future.set_exception(PlanCancelled(f"request {j.handle.rid} was cancelled"))
                    self.metrics.add(plans_skipped=1)
                else:
                    live.append(j)
            if not live:
                self._jobs = live
                return []
            batch = [live.popleft()]
            rest: collections.deque[_Job] = collections.deque()
            for j in live:
                (batch if j.key == batch[0].key and len(batch) < self.max_batch else rest).append(j)
            self._jobs = rest
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            try:
                results = self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
                for j in batch:
                    j.future.set_exception(e)
            else:
                for j, r in zip(batch, results, strict=True):
                    j.future.set_result(r)

    # ------------------------------------------------------------------ model work (worker thread only)
    def _run(self, batch: list[_Job]) -> list[Any]:
        from planners.planner import PlanResult, inference
        from planners.sampler import infill, sample
        from planners.strategies import COUNTED_COMMITS

        self.metrics.add(plan_batches=1, plan_rows=len(batch))
        self.metrics.peak("plan_max_batch", len(batch))
        started = time.monotonic()
        cfg = self.planner.resolve(batch[0].config) if hasattr(self.planner, "resolve") else batch[0].config
        prompts = [j.prompt_ids for j in batch]
        # on the planner's model thread when it has one (`Planner.call`: where its model was loaded, one OpenMP pool)
        call = getattr(self.planner, "call", None) or inference
        if batch[0].kind == "plan":
            out = call(sample, self.planner.model, prompts, cfg, on_block=self._block_hook(batch))
        else:
            out = call(infill, self.planner.model, [j.span for j in batch], cfg, prompts=prompts)
        per_pass = 2 if cfg.cfg_scale > 0 else 1
        results = []
        for i, j in enumerate(batch):
            span = [int(t) for t in out.tokens[i].tolist()]
            tokens = span[: int(out.lengths[i])]
            traj = out.trajectories[i] if out.trajectories else None
            steps = out.steps
            if traj is not None and len(batch) > 1:
                traj = _solo_trajectory(traj, counted=cfg.commit in COUNTED_COMMITS, per_pass=per_pass)
                steps = len(traj.steps)
            with self._tok:
                text = self.planner.decode(tokens)
            stats = {
                "nfe": steps * per_pass,
                "steps": steps,
                "seconds": out.seconds,
                "gen_length": cfg.gen_length,
                "tokens": len(tokens),
                "tokens_per_step": len(span) / max(1, steps),
                "batch_size": len(batch),
                "batch_nfe": int(out.nfe),
                "queue_ms": (started - j.enqueued) * 1000,
            }
            results.append(PlanResult(text, tokens, list(j.prompt_ids), traj, stats, span=span))
        return results

    def _block_hook(self, batch: list[_Job]) -> Any:
        """A `denoise(on_block=...)` callback that reports each finished block to the rows that asked, exactly as
        `Planner.plan(on_block=...)` reports it for the same row alone (None when no row asked). The batch stops
        early only if every row asks it to (its callback returning True)."""
        if not any(j.on_block for j in batch):
            return None
        hooks = [self.planner._progress(j.on_block) if j.on_block else None for j in batch]  # each keeps its text
        stop = [False] * len(batch)

        def on_block(done: Any) -> bool:
            for i, hook in enumerate(hooks):
                if hook is not None:
                    with self._tok:  # the hook decodes
                        stop[i] = bool(hook(dataclasses.replace(done, span=done.span[i : i + 1])))
            return all(stop)

        return on_block


def _solo_trajectory(traj: Any, *, counted: bool, per_pass: int) -> Any:
    """The trajectory a row would have had alone: drop the steps it only waited through while other rows of its
    batch finished a block (dynamic commit rules: steps committing nothing; counted rules, which run in
    lockstep: whole blocks in which the row had nothing to fill), then renumber the steps."""
    if counted:
        active = {s.block for s in traj.steps if s.committed}
        keep = [s for s in traj.steps if s.block in active]
    else:
        keep = [s for s in traj.steps if s.committed or s.remasked]
    steps = [dataclasses.replace(s, step=k) for k, s in enumerate(keep)]
    return dataclasses.replace(traj, steps=steps, nfe=len(steps) * per_pass)
