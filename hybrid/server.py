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
Parsing, validation, error bodies and the `hybrid` chunk objects live in `hybrid.openai_protocol`.

Concurrency. The planner is not thread-safe and is the expensive step, so planner calls go through one
worker thread (`planners.batching.BatchingPlanner`): calls whose sampler settings match are denoised together
in one batch (`planners.sampler.sample` decodes different-length prompts, left-padded, in one loop), oldest
first, up to `max_batch`; a request whose client left is dropped from the queue. Batched rows get the
trajectory and NFE a solo run would have had (idle steps of rows that finished early are removed), so TSE does
not depend on who shared the batch. Realizers stream on the event loop (the embedded one decodes in its own
thread). A client that disconnects cancels its graph run: the realizer's stream is closed (the embedded model
stops within a token; an OpenAI-compatible upstream sees the HTTP stream close, which makes vLLM abort the
request). With `fallback` (`realizers.fallback.FallbackRealizer`), a realizer failure before the first token
sends the request to the fallback realizer (and keeps the primary off for `fallback_retry_s`); a failure after
tokens went out is reported in the stream.

What it does not know: how plans are drafted or scored, or which model realizes — that is the graph and
the context it is given (`create_app(ctx)`; `main` builds one with `hybrid.runtime.build_context`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Limits and BatchingPlanner are also this module's public names: tests import them from hybrid.server
from hybrid.config import MODES
from hybrid.openai_protocol import (
    ApiError,
    Limits,
    Turn,
    _bad,
    _done_info,
    _finish_reason,
    _plan_info,
    _sse,
    _usage,
    parse_body,
    run_error,
    validate_request,
)
from hybrid.state import HybridContext
from planners.batching import _REQUEST, BatchingPlanner, _Handle
from realizers.fallback import FallbackRealizer

log = logging.getLogger("hybrid.server")

DEFAULT_MODEL_NAME = "hybrid"


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
    """The server's counters (`GET /metrics`); it is also the `metrics` object of the `BatchingPlanner`
    (`planners.batching.BatchStats` fields) and the `FallbackRealizer` (`fallbacks`)."""

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
        api_key=args.api_key or os.environ.get("HYBRID_API_KEY"),
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
