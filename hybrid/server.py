"""OpenAI-compatible HTTP server for the hybrid pipeline (`hybrid serve`), shaped for voice backends.

    POST /v1/chat/completions   stream=true: SSE in OpenAI's chunk format; else one chat.completion body
    GET  /v1/models             the served model name
    GET  /health                200 while the process serves
    GET  /metrics               JSON counters: requests, completed, failed, cancelled, fallbacks, planner batches

Every request runs the prebuilt LangGraph graph (`hybrid.graph.build_graph`) with the server's `HybridContext`
(per-request sampling settings and mode copied into its config); the server translates the graph's custom
stream into chunks. The plan travels beside the answer, the way vLLM streams `reasoning_content`: after the
role chunk, chunks with an empty delta carry a `hybrid` object (`draft`, `score`, `revise` progress), then one
chunk carries `delta.reasoning_content` = the plan handed to the realizer with its TSE, revisions, NFE and
plan time, then `delta.content` tokens, so a voice client speaks only `content`. Usage arrives as OpenAI's
final usage chunk (`stream_options.include_usage`); timings ride on the finish chunk's `hybrid` object.
A failure after the stream started is one SSE `data: {"error": {...}}` event, then `data: [DONE]` (the
openai client raises it as `APIError`); before that, every error is an OpenAI-style body with a 4xx/5xx.

Concurrency. The planner is not thread-safe and is the expensive step, so planner calls go through one
worker thread (`BatchingPlanner`): calls whose sampler settings match are denoised together in one batch
(`planners.sampler.sample` decodes different-length prompts, left-padded, in one loop), oldest first, up to
`max_batch`; a request whose client left is dropped from the queue. Batched rows get the trajectory and NFE a
solo run would have had (idle steps of rows that finished early are removed), so TSE does not depend on who
shared the batch. Realizers stream on the event loop (the embedded one decodes in its own thread). A client
that disconnects cancels its graph run: the realizer's stream is closed (the embedded model stops within a
token; an OpenAI-compatible upstream sees the HTTP stream close, which makes vLLM abort the request).
With `fallback`, a realizer failure before the first token sends the request to the fallback realizer (and
keeps the primary off for `fallback_retry_s`); a failure after tokens went out is reported in the stream.

What it does not know: how plans are drafted or scored, or which model realizes — that is the graph and
the context it is given (`create_app(ctx)`; `main` builds one with `hybrid.runtime.build_context`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid.config import MODES, HybridConfig
from hybrid.state import HybridContext
from realizers.base import (
    RealizerError,
    RealizerHTTPError,
    RealizerTimeout,
    RealizerUnavailable,
    SamplingParams,
    StreamEvent,
    TextDelta,
)

log = logging.getLogger("hybrid.server")

DEFAULT_MODEL_NAME = "hybrid"
ROLES = ("system", "developer", "user", "assistant")


# ============================================================================================ errors
class ApiError(Exception):
    """An error with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def run_error(e: BaseException) -> ApiError:
    """What a failed graph run tells the client (the status is used by non-streamed responses)."""
    if isinstance(e, RealizerUnavailable):
        return ApiError(503, f"realizer unavailable: {e}", type="server_error", code="realizer_unavailable")
    if isinstance(e, RealizerTimeout):
        return ApiError(504, f"realizer timed out: {e}", type="server_error", code="realizer_timeout")
    if isinstance(e, RealizerHTTPError):
        return ApiError(502, f"realizer error: {e}", type="server_error", code="realizer_http_error")
    if isinstance(e, RealizerError):
        return ApiError(502, f"realizer failed: {e}", type="server_error", code="realizer_error")
    if isinstance(e, TimeoutError):
        return ApiError(504, "the request exceeded the server's time limit", type="server_error", code="timeout")
    if isinstance(e, ValueError):  # a prompt too long for a component, and similar input problems
        return ApiError(400, str(e), code="context_length_exceeded" if "context" in str(e) else "invalid_value")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


# ============================================================================================ requests
@dataclass(frozen=True)
class Limits:
    """Request limits; anything beyond them is a 4xx before any model work."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 128
    max_content_chars: int = 8000  # per message (the last user message is also the graph's question)
    max_total_chars: int = 64000  # all messages together
    max_tokens: int = 4096  # ceiling on a request's max_tokens (and the realizer's context, when it has one)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat request this server reads (others are accepted and ignored, except those
    `validate_request` refuses because honouring them silently would be wrong: n > 1, tools, stop, logprobs)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[_Message]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    hybrid_mode: str | None = None


@dataclass
class Turn:
    """A validated request, in the graph's terms."""

    question: str
    history: list[dict[str, str]]
    mode: str
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> ChatRequest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        code = "missing_required_parameter" if err["type"] == "missing" else "invalid_type"
        raise _bad(f"{loc}: {err['msg']}", param=loc, code=code) from None


def _text(m: _Message, i: int) -> str:
    c = m.content
    if c is None:
        raise _bad(f"messages[{i}].content is required", param=f"messages.{i}.content")
    if isinstance(c, str):
        return c
    parts = []
    for j, part in enumerate(c):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(
                f"messages[{i}].content[{j}]: only text parts are supported (got type {part.get('type')!r})",
                param=f"messages.{i}.content",
            )
        parts.append(part["text"])
    return "".join(parts)


def validate_request(
    req: ChatRequest, *, limits: Limits, config: HybridConfig, modes: Sequence[str], model_names: Sequence[str]
) -> Turn:
    """Check fields and limits; map OpenAI messages onto the graph's input (last user message = question,
    earlier turns, system ones included, = history). Raises ApiError (4xx) naming the parameter."""
    if req.model is not None and req.model not in model_names:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this server serves {', '.join(model_names)}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    if not req.messages:
        raise _bad("messages must be a non-empty list", param="messages")
    if len(req.messages) > limits.max_messages:
        raise _bad(f"{len(req.messages)} messages; the limit is {limits.max_messages}", param="messages")
    turns, total = [], 0
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise _bad(
                f"messages[{i}].role={m.role!r} is not supported; use one of {', '.join(ROLES)}",
                param=f"messages.{i}.role",
            )
        text = _text(m, i)
        if len(text) > limits.max_content_chars:
            raise _bad(
                f"messages[{i}].content is {len(text)} characters; the limit is {limits.max_content_chars}",
                param=f"messages.{i}.content",
                code="string_above_max_length",
            )
        total += len(text)
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if total > limits.max_total_chars:
        raise _bad(f"the messages hold {total} characters; the limit is {limits.max_total_chars}", param="messages")
    if turns[-1]["role"] != "user":
        raise _bad("the last message must have role 'user'", param="messages")
    question = turns[-1]["content"].strip()
    if not question:
        raise _bad("the last user message is empty", param="messages")
    if req.n not in (None, 1):
        raise _bad("n must be 1 (one choice per request)", param="n", code="unsupported_parameter")
    if req.tools:
        raise _bad("tools are not supported by this server", param="tools", code="unsupported_parameter")
    if req.stop:
        raise _bad("stop sequences are not supported by this server", param="stop", code="unsupported_parameter")
    if req.logprobs:
        raise _bad("logprobs are not supported by this server", param="logprobs", code="unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _bad(
            "only response_format type 'text' is supported", param="response_format", code="unsupported_parameter"
        )
    mode = req.hybrid_mode or config.mode
    if mode not in MODES:
        raise _bad(f"hybrid_mode={mode!r} is not valid; choose one of {', '.join(MODES)}", param="hybrid_mode")
    if mode not in modes:
        raise _bad(
            f"hybrid_mode={mode!r} is not loaded on this server (loaded: {', '.join(modes)}); "
            "start it with --load-modes to add it",
            param="hybrid_mode",
        )
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    if max_tokens is None:
        max_tokens = min(config.realizer.max_tokens, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise _bad(f"{param}={max_tokens} is out of range; it must be between 1 and {limits.max_tokens}", param=param)
    temperature = config.realizer.temperature if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise _bad(f"temperature={temperature} is out of range [0, 2]", param="temperature")
    top_p = config.realizer.top_p if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p={top_p} is out of range (0, 1]", param="top_p")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Turn(question, turns[:-1], mode, max_tokens, temperature, top_p, req.stream, include_usage)


def turn_context(base: HybridContext, turn: Turn) -> HybridContext:
    """The server's context with this request's mode and sampling settings (the config is copied, the models
    are shared)."""
    cfg = base.config
    realizer = cfg.realizer.model_copy(
        update={"max_tokens": turn.max_tokens, "temperature": turn.temperature, "top_p": turn.top_p}
    )
    return dataclasses.replace(base, config=cfg.model_copy(update={"mode": turn.mode, "realizer": realizer}))


# ============================================================================================ metrics
@dataclass
class Metrics:
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    rejected: int = 0  # answered 4xx before any model work
    active: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0  # client disconnected before the answer was complete: its run was cancelled
    fallbacks: int = 0  # requests the fallback realizer answered
    plan_batches: int = 0
    plan_rows: int = 0
    plan_max_batch: int = 0
    plans_skipped: int = 0  # queued planner calls dropped because their request was cancelled

    def snapshot(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["uptime_s"] = round(time.time() - d.pop("started_at"), 1)
        d["plan_mean_batch"] = round(self.plan_rows / self.plan_batches, 2) if self.plan_batches else 0.0
        return d


# ============================================================================================ planner queue
@dataclass
class _Handle:
    """One request, as seen from worker threads (the graph's nodes call the planner through `to_thread`, which
    copies this context variable)."""

    rid: str
    cancelled: threading.Event = field(default_factory=threading.Event)


_REQUEST: contextvars.ContextVar[_Handle | None] = contextvars.ContextVar("hybrid_server_request", default=None)


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
    handle: _Handle | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def key(self) -> tuple:
        return (self.kind, self.config, len(self.span) if self.span is not None else None)


class BatchingPlanner:
    """The `Planner` surface the graph's nodes use (plan, redraw, encode, decode, model, sampler), with every
    model call made by one worker thread, FIFO, concurrent `plan` calls with equal sampler settings batched.

    `plan` / `redraw` block their (worker-pool) caller until their batch is done. The worker takes the oldest
    queued call, waits `window_s` after its arrival for company, and batches it with every later queued call of
    the same kind and SamplerConfig (up to `max_batch`): plans through `sampler.sample`, redraws through
    `sampler.infill` (prompts + partly masked spans), the same computation `Planner.plan` / `Planner.redraw`
    do for one row. Tokenizer calls from other threads (TSE scoring decodes) take a lock: fast tokenizers are
    not safe to share between threads."""

    def __init__(self, planner: Any, *, max_batch: int = 16, window_s: float = 0.005, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.planner = planner
        self.max_batch, self.window_s = max_batch, window_s
        self.metrics = metrics or Metrics()
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

    def plan(self, prompt, *, system: str | None = None, config=None, **overrides):
        cfg = config or self.planner.sampler
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        ids = self.encode(prompt, system=system)
        self.planner.check_prompt(ids, cfg.gen_length)
        return self._submit(_Job("plan", cfg, ids))

    def redraw(self, previous, positions, *, config=None):
        """Remask `positions` (relative to the span) of a previous PlanResult and denoise them again."""
        cfg = config or self.planner.sampler
        span = list(previous.span or previous.tokens)
        if len(span) != cfg.gen_length:  # as Planner.redraw: the span sets the length
            cfg = dataclasses.replace(cfg, gen_length=len(span), steps=max(1, min(cfg.steps, len(span))))
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
                    self.metrics.plans_skipped += 1
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
        import torch

        from planners.planner import PlanResult
        from planners.sampler import infill, sample
        from planners.strategies import COUNTED_COMMITS

        m = self.metrics
        m.plan_batches += 1
        m.plan_rows += len(batch)
        m.plan_max_batch = max(m.plan_max_batch, len(batch))
        started = time.monotonic()
        cfg = batch[0].config
        prompts = [j.prompt_ids for j in batch]
        with torch.inference_mode():
            if batch[0].kind == "plan":
                out = sample(self.planner.model, prompts, cfg)
            else:
                out = infill(self.planner.model, [j.span for j in batch], cfg, prompts=prompts)
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


# ============================================================================================ fallback
class FallbackRealizer:
    """Streams from `primary`; if it fails before its first token, streams the same request from `fallback`
    and leaves the primary alone for `retry_after_s` (requests go straight to the fallback meanwhile). A
    failure after tokens went out is raised: the client already has part of the answer."""

    def __init__(self, primary: Any, fallback: Any, *, retry_after_s: float = 5.0, metrics: Metrics | None = None):
        self.primary, self.fallback = primary, fallback
        self.retry_after_s = retry_after_s
        self.metrics = metrics or Metrics()
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
        self.metrics.fallbacks += 1
        async for ev in self.fallback.astream(messages, params):
            yield ev

    async def aclose(self) -> None:
        for r in (self.primary, self.fallback):
            await r.aclose()


# ============================================================================================ one run
class _Run:
    """One graph run in its own task; its events ("custom", "values", then one of "end", "error", "cancelled")
    go to a queue in order. `cancel()` stops it."""

    def __init__(
        self, graph: Any, inputs: dict[str, Any], ctx: HybridContext, rid: str, timeout_s: float, on_done=None
    ) -> None:
        self.rid = rid
        self.handle = _Handle(rid)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.received = time.time()
        self.finished = False  # a consumer has seen the last event
        self.task = asyncio.create_task(self._main(graph, inputs, ctx, timeout_s), name=f"hybrid-run-{rid}")
        if on_done is not None:
            self.task.add_done_callback(lambda _t: on_done())

    async def _main(self, graph: Any, inputs: dict[str, Any], ctx: HybridContext, timeout_s: float) -> None:
        _REQUEST.set(self.handle)  # this task's own context: node tasks and their worker threads inherit it
        try:
            async with asyncio.timeout(timeout_s):
                async for mode, chunk in graph.astream(inputs, context=ctx, stream_mode=["custom", "values"]):
                    self.queue.put_nowait((mode, chunk))
        except asyncio.CancelledError:
            self.queue.put_nowait(("cancelled", None))
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client
            self.queue.put_nowait(("error", e))
        else:
            self.queue.put_nowait(("end", None))

    async def events(self, keepalive_s: float) -> AsyncIterator[tuple[str, Any]]:
        """Queue items in order; ("ping", None) after `keepalive_s` of silence. Ends after the last event."""
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=keepalive_s)
                if not done:
                    yield ("ping", None)
                    continue
                item, getter = getter.result(), None
                if item[0] in ("end", "error", "cancelled"):
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:
            if getter is not None:
                getter.cancel()

    def cancel(self) -> bool:
        """Cancel the run if it is still going; True if it was. Does not wait (the caller may itself be
        cancelled): the realize node's stream is closed as the cancellation unwinds the graph."""
        if self.finished or self.task.done():
            return False
        self.handle.cancelled.set()  # queued planner calls of this request are dropped
        self.task.cancel()
        return True


def _plan_info(state: dict[str, Any], ev: dict[str, Any], wall_ms: float) -> dict[str, Any]:
    t = state.get("timings", {}) if state else {}
    stats = state.get("plan_stats", {}) if state else {}
    return {
        "event": "plan",
        "mode": ev.get("mode"),
        "tse": ev.get("tse"),
        "revisions": ev.get("revisions", 0),
        "accepted": ev.get("accepted"),
        "nfe": int(t.get("nfe", 0)),
        "plan_ms": round(t.get("plan_ms", 0.0), 1),
        "score_ms": round(t.get("score_ms", 0.0), 1),
        "wall_ms": round(wall_ms, 1),
        "batch_size": stats.get("batch_size"),
        "queue_ms": round(stats["queue_ms"], 1) if "queue_ms" in stats else None,
    }


def _done_info(state: dict[str, Any], server: dict[str, float]) -> dict[str, Any]:
    t = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in state.get("timings", {}).items()}
    t.pop("started_at", None)
    best = state.get("best")
    tse = best["tse"] if best is not None and not state.get("accepted") else state.get("tse")  # the draft handed on
    return {
        "event": "done",
        "mode": state.get("mode"),
        "tse": tse,
        "revisions": state.get("revisions", 0),
        "accepted": state.get("accepted"),
        "warnings": state.get("warnings", []),
        "timings": {**t, **server},
    }


def _usage(state: dict[str, Any]) -> dict[str, int]:
    u = state.get("usage", {}) or {}
    p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(state: dict[str, Any]) -> str:
    return (state.get("usage", {}) or {}).get("finish_reason") or "stop"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False, default=str)}\n\n"


# ============================================================================================ the app
@dataclass
class _Server:
    ctx: HybridContext
    graph: Any
    limits: Limits
    api_key: str | None
    model_name: str
    modes: tuple[str, ...]
    metrics: Metrics
    batcher: BatchingPlanner | None
    max_active: int
    request_timeout_s: float
    keepalive_s: float
    max_workers: int


def available_modes(ctx: HybridContext) -> tuple[str, ...]:
    """hybrid needs planner + realizer, diffusion the planner, ar the realizer."""
    have_p, have_r = ctx.planner is not None, ctx.realizer is not None
    ok = {"hybrid": have_p and have_r, "diffusion": have_p, "ar": have_r}
    return tuple(m for m in MODES if ok[m])


def create_app(
    ctx: HybridContext,
    *,
    api_key: str | None = None,
    fallback: Any = None,
    fallback_retry_s: float = 5.0,
    limits: Limits | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch: int = 16,
    batch_window_ms: float = 5.0,
    max_active: int = 256,
    request_timeout_s: float = 300.0,
    keepalive_s: float = 10.0,
):
    """The FastAPI app over `ctx` (built by `hybrid.runtime.build_context`, or by a test). The app wraps the
    planner in a `BatchingPlanner` and the realizer in a `FallbackRealizer` when `fallback` (a Realizer) is
    given; `ctx` itself is not modified. `api_key`: required as `Authorization: Bearer ...` on /v1/*.
    `max_active`: concurrent requests beyond it get 429."""
    from hybrid.graph import build_graph

    metrics = Metrics()
    batcher = None
    planner = ctx.planner
    if planner is not None and not isinstance(planner, BatchingPlanner):
        batcher = BatchingPlanner(planner, max_batch=max_batch, window_s=batch_window_ms / 1000, metrics=metrics)
        planner = batcher
    elif isinstance(planner, BatchingPlanner):
        planner.metrics = metrics
    realizer = ctx.realizer
    if realizer is not None and fallback is not None:
        realizer = FallbackRealizer(realizer, fallback, retry_after_s=fallback_retry_s, metrics=metrics)
    limits = limits or Limits(max_content_chars=ctx.config.max_question_chars)
    ctx_limit = getattr(ctx.realizer, "context_length", None)
    if isinstance(ctx_limit, int) and ctx_limit > 0 and ctx_limit < limits.max_tokens:
        limits = dataclasses.replace(limits, max_tokens=ctx_limit)
    s = _Server(
        ctx=dataclasses.replace(ctx, planner=planner, realizer=realizer),
        graph=build_graph(),
        limits=limits,
        api_key=api_key or None,
        model_name=model_name,
        modes=available_modes(ctx),
        metrics=metrics,
        batcher=batcher,
        max_active=max_active,
        request_timeout_s=request_timeout_s,
        keepalive_s=keepalive_s,
        max_workers=max_active + 32,
    )

    @asynccontextmanager
    async def lifespan(app):
        # graph nodes call the planner / scorer through asyncio.to_thread: one pool thread per waiting request
        # (the default pool has min(32, cpus + 4) threads, which would cap planner batches at that size)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="hybrid-serve")
        asyncio.get_running_loop().set_default_executor(pool)
        log.info("serving %s (modes: %s)", s.model_name, ", ".join(s.modes))
        try:
            yield
        finally:
            if s.batcher is not None:
                await asyncio.to_thread(s.batcher.close)
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.server = s

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status < 500:
            s.metrics.rejected += 1
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(_bad(str(e)))

    def check_key(request: Request) -> None:
        if s.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise ApiError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = s.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_name, "modes": list(s.modes), "active": s.metrics.active}

    @app.get("/metrics")
    async def get_metrics():
        snap = s.metrics.snapshot()
        snap["planner_queued"] = s.batcher.queued if s.batcher is not None else 0
        return snap

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {"id": s.model_name, "object": "model", "created": int(s.metrics.started_at), "owned_by": "hybrid"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        s.metrics.requests += 1
        check_key(request)
        req = parse_body(await read_body(request))
        turn = validate_request(req, limits=s.limits, config=s.ctx.config, modes=s.modes, model_names=(s.model_name,))
        if s.metrics.active >= s.max_active:
            raise ApiError(
                429,
                f"the server is at its limit of {s.max_active} concurrent requests; retry shortly",
                type="rate_limit_error",
                code="server_overloaded",
            )
        rctx = turn_context(s.ctx, turn)
        if turn.mode != "ar":
            await check_planner_fit(rctx, turn)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        inputs = {"question": turn.question, "mode": turn.mode, "history": turn.history}
        s.metrics.active += 1
        run = _Run(s.graph, inputs, rctx, rid, s.request_timeout_s, on_done=finished)
        if turn.stream:
            return StreamingResponse(
                stream(run, turn, rid),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": rid},
            )
        return await complete(run, turn, rid, request)

    def finished() -> None:
        s.metrics.active -= 1

    def abandon(run: _Run) -> None:
        """The client left before the end: cancel its run and count it."""
        if run.cancel():
            s.metrics.cancelled += 1
            log.info("%s cancelled: the client disconnected", run.rid)

    async def check_planner_fit(rctx: HybridContext, turn: Turn) -> None:
        from hybrid import prompts

        build = prompts.answer_messages if turn.mode == "diffusion" else prompts.plan_messages
        planner = s.ctx.planner
        ids = await asyncio.to_thread(planner.encode, build(turn.question, turn.history))
        budget = planner.context_length - planner.sampler.gen_length
        if len(ids) > budget:
            raise _bad(
                f"the conversation is {len(ids)} planner tokens; the planner's context leaves room for {budget}",
                param="messages",
                code="context_length_exceeded",
            )

    def chunk(rid: str, created: int, delta: dict[str, Any], finish: str | None = None, **extra) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": s.model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }

    async def stream(run: _Run, turn: Turn, rid: str) -> AsyncIterator[str]:
        created = int(run.received)
        state: dict[str, Any] = {}
        first_token: float | None = None
        try:
            yield _sse(chunk(rid, created, {"role": "assistant", "content": ""}))
            async for kind, payload in run.events(s.keepalive_s):
                if kind == "ping":
                    yield ": keep-alive\n\n"
                elif kind == "values":
                    state = payload
                elif kind == "custom":
                    t = payload.get("type")
                    if t == "token":
                        if first_token is None:
                            first_token = time.time()
                        yield _sse(chunk(rid, created, {"content": payload["text"]}))
                    elif t == "status" and payload.get("stage") == "realize" and turn.mode != "ar":
                        info = _plan_info(state, payload, (time.time() - run.received) * 1000)
                        delta = {"reasoning_content": payload["plan"]} if payload.get("plan") else {}
                        yield _sse(chunk(rid, created, delta, hybrid=info))
                    elif t == "plan":
                        info = {"event": "draft", "nfe": payload.get("nfe"), "plan_ms": round(payload["plan_ms"], 1)}
                        yield _sse(chunk(rid, created, {}, hybrid=info))
                    elif t == "score":
                        info = {
                            "event": "score",
                            "tse": payload.get("tse"),
                            "accepted": payload.get("accepted"),
                            "revision": payload.get("revision"),
                        }
                        yield _sse(chunk(rid, created, {}, hybrid=info))
                    elif t == "revise":
                        info = {
                            "event": "revise",
                            "revision": payload.get("revision"),
                            "positions": payload.get("positions"),
                        }
                        yield _sse(chunk(rid, created, {}, hybrid=info))
                elif kind == "error":
                    err = run_error(payload)
                    s.metrics.failed += 1
                    log.warning("%s failed: %s", rid, err.message)
                    yield _sse(err.body())
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "end":
                    now = time.time()
                    server = {"server_total_ms": round((now - run.received) * 1000, 1)}
                    if first_token is not None:
                        server["server_ttft_ms"] = round((first_token - run.received) * 1000, 1)
                    yield _sse(chunk(rid, created, {}, _finish_reason(state), hybrid=_done_info(state, server)))
                    if turn.include_usage:
                        yield _sse({**chunk(rid, created, {}), "choices": [], "usage": _usage(state)})
                    yield "data: [DONE]\n\n"
                    s.metrics.completed += 1
                    return
        finally:
            abandon(run)  # a no-op after the last event; else the client's connection closed and this was cancelled

    async def complete(run: _Run, turn: Turn, rid: str, request: Request):
        state: dict[str, Any] = {}
        watcher = asyncio.ensure_future(_on_disconnect(request, lambda: abandon(run)))
        try:
            async for kind, payload in run.events(s.keepalive_s):
                if kind == "values":
                    state = payload
                elif kind == "error":
                    err = run_error(payload)
                    s.metrics.failed += 1
                    log.warning("%s failed: %s", rid, err.message)
                    return error_response(err)
                elif kind == "cancelled":  # nobody is listening any more
                    return JSONResponse({}, status_code=499)
        finally:
            watcher.cancel()
            abandon(run)
        s.metrics.completed += 1
        server = {"server_total_ms": round((time.time() - run.received) * 1000, 1)}
        plan = state.get("plan") if turn.mode == "hybrid" else None
        message = {"role": "assistant", "content": state.get("answer", ""), "reasoning_content": plan}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(run.received),
            "model": s.model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(state)}],
            "usage": _usage(state),
            "hybrid": _done_info(state, server),
        }

    return app


async def _on_disconnect(request: Any, callback, interval_s: float = 0.25) -> None:
    """Call `callback` once the client of a non-streamed request has gone (polled: Starlette only watches
    for disconnects while it streams)."""
    while not await request.is_disconnected():
        await asyncio.sleep(interval_s)
    callback()


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    from hybrid.cli import _add_run_options

    p = argparse.ArgumentParser(
        prog="hybrid serve",
        description="OpenAI-compatible server for the hybrid pipeline (plan in diffusion, talk in autoregression).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env HYBRID_API_KEY)")
    _add_run_options(p)
    p.add_argument(
        "--load-modes",
        default=None,
        help="modes to load models for: comma list of hybrid,diffusion,ar or 'all' (default: the configured mode); "
        "a request picks one with the body field hybrid_mode",
    )
    p.add_argument(
        "--fallback-url", help="OpenAI-compatible server used when the realizer fails before its first token"
    )
    p.add_argument("--fallback-model", help="served model name at --fallback-url (default: its first)")
    p.add_argument("--fallback-retry", type=float, default=5.0, help="seconds the failed primary is skipped")
    p.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--max-batch", type=int, default=16, help="planner requests denoised together, at most")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="wait for company before an idle batch")
    p.add_argument("--max-active", type=int, default=256, help="concurrent requests before 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-messages", type=int, default=128)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is abandoned")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _load_modes(value: str | None, configured: str) -> set[str]:
    if not value:
        return {configured}
    if value == "all":
        return set(MODES)
    modes = {m.strip() for m in value.split(",") if m.strip()}
    bad = modes - set(MODES)
    if bad:
        raise ValueError(f"--load-modes: {', '.join(sorted(bad))} not valid; choose from {', '.join(MODES)} or all")
    return modes | {configured}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from hybrid.cli import UserError, _err, _progress, config_from_args
    from hybrid.runtime import SetupError, build_context

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the key is the server's, not a config field: keep it out of HybridConfig's HYBRID_* environment layer
    env_key = os.environ.pop("HYBRID_API_KEY", None)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    say = _progress(False)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        cfg = config_from_args(args)
        modes = _load_modes(args.load_modes, cfg.mode)
        ctx = build_context(cfg, say, modes=modes)
    except (UserError, SetupError, ValueError) as e:
        _err(str(e))
        return 2
    fallback = None
    if args.fallback_url:
        from realizers.openai_compat import OpenAIRealizer

        r = cfg.realizer
        fallback = OpenAIRealizer(
            args.fallback_url,
            args.fallback_model,
            timeout_s=r.timeout_s,
            connect_timeout_s=r.connect_timeout_s,
            max_retries=r.max_retries,
        )
    app = create_app(
        ctx,
        api_key=args.api_key or env_key,
        fallback=fallback,
        fallback_retry_s=args.fallback_retry,
        limits=Limits(
            max_body_bytes=args.max_body_bytes,
            max_messages=args.max_messages,
            max_content_chars=cfg.max_question_chars,
            max_tokens=args.max_tokens_limit,
        ),
        model_name=args.served_model_name,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_active=args.max_active,
        request_timeout_s=args.request_timeout,
    )
    say(f"listening on http://{args.host}:{args.port}/v1 (model {args.served_model_name!r})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
