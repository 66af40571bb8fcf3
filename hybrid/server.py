"""OpenAI-compatible HTTP server for the hybrid pipeline (`hybrid serve`), shaped for voice backends.

    POST /v1/chat/completions   stream=true: SSE in OpenAI's chunk format; else one chat.completion body
    GET  /v1/models             the served model name
    GET  /health                200 while the process serves
    GET  /metrics               JSON counters: requests, completed, failed, cancelled, fallbacks, planner batches

Three parts, each usable alone:

- the routes (this module, `Routes`): HTTP only — the API key, body limits, validation (`hybrid.openai_protocol`),
  admission, and writing what the other two produce as JSON or SSE;
- the run manager (`hybrid.run_manager`): graph runs on a loop and thread pool of its own, admission
  (`max_active`, else 429), cancellation when a client leaves, the metrics behind one lock;
- the stream translator (`hybrid.stream_translator`): the graph's custom events -> chat.completion.chunk objects.
  The plan streams as `delta.reasoning_content` block by block while it forms (vLLM's reasoning field), the
  answer as `delta.content`, so a voice client speaks only `content`; `hybrid` objects carry progress, the
  plan handed to the realizer with its score, and timings.

Usage arrives as OpenAI's final usage chunk (`stream_options.include_usage`); timings ride on the finish chunk's
`hybrid` object. A failure after the stream started is one SSE `data: {"error": {...}}` event, then
`data: [DONE]` (the openai client raises it as `APIError`); before that, every error is an OpenAI-style body
with a 4xx/5xx.

Concurrency. The planner is not thread-safe and is the expensive step, so planner calls go through one
worker thread (`planners.batching.BatchingPlanner`): calls whose sampler settings match are denoised together
in one batch, oldest first, up to `max_batch`; a request whose client left is dropped from the queue. Batched
rows get the trajectory and NFE a solo run would have had, so TSE does not depend on who shared the batch.
A client that disconnects cancels its graph run: the realizer's stream is closed (the embedded model stops
within a token; an OpenAI-compatible upstream sees the HTTP stream close, which makes vLLM abort the request).
With `fallback` (`realizers.fallback.FallbackRealizer`), a realizer failure before the first token sends the
request to the fallback realizer (and keeps the primary off for `fallback_retry_s`); a failure after tokens
went out is reported in the stream. `--vllm-local` starts the local vLLM CPU server (`realizers.local_vllm`)
and realizes through it.

What it does not know: how plans are drafted or scored, or which model realizes — that is the graph and
the context it is given (`create_app(ctx)`; `main` builds one with `hybrid.runtime.build_context`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Limits, Metrics and BatchingPlanner are also this module's public names: tests import them from hybrid.server
from hybrid.config import MODES
from hybrid.openai_protocol import ApiError, Limits, Turn, _bad, _sse, parse_body, run_error, validate_request
from hybrid.run_manager import Metrics, Overloaded, Run, RunManager
from hybrid.state import HybridContext
from hybrid.stream_translator import StreamTranslator, completion_body
from planners.batching import BatchingPlanner
from realizers.fallback import FallbackRealizer

__all__ = ["BatchingPlanner", "Limits", "Metrics", "Routes", "RunManager", "create_app", "main", "serving_context"]

log = logging.getLogger("hybrid.server")

DEFAULT_MODEL_NAME = "hybrid"


def turn_context(base: HybridContext, turn: Turn) -> HybridContext:
    """The server's context with this request's mode and sampling settings, the planner's (`hybrid_planner`)
    included (the config is copied, the models are shared; the batching planner batches only requests whose
    SamplerConfigs are equal)."""
    cfg = base.config
    realizer = cfg.realizer.model_copy(
        update={"max_tokens": turn.max_tokens, "temperature": turn.temperature, "top_p": turn.top_p}
    )
    update: dict[str, Any] = {"mode": turn.mode, "realizer": realizer}
    if turn.planner is not None:
        update["planner"] = turn.planner
    return dataclasses.replace(base, config=cfg.model_copy(update=update))


def available_modes(ctx: HybridContext) -> tuple[str, ...]:
    """hybrid needs planner + realizer, diffusion the planner, ar the realizer."""
    have_p, have_r = ctx.planner is not None, ctx.realizer is not None
    ok = {"hybrid": have_p and have_r, "diffusion": have_p, "ar": have_r}
    return tuple(m for m in MODES if ok[m])


def serving_context(
    ctx: HybridContext,
    metrics: Metrics,
    *,
    fallback: Any = None,
    fallback_retry_s: float = 5.0,
    max_batch: int = 16,
    batch_window_ms: float = 5.0,
) -> tuple[HybridContext, BatchingPlanner | None]:
    """`ctx` as the server runs it: the planner behind a `BatchingPlanner` (returned too when this call made it,
    so the server closes it), the realizer behind a `FallbackRealizer` when `fallback` is given; both report
    to `metrics`. `ctx` itself is not modified."""
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
    return dataclasses.replace(ctx, planner=planner, realizer=realizer), batcher


# ============================================================================================ routes
class Routes:
    """The HTTP side: one method per route, plus the request checks. Model work goes to `runs`; chunks come
    from a `StreamTranslator` per streamed request."""

    def __init__(
        self,
        ctx: HybridContext,
        runs: RunManager,
        *,
        limits: Limits,
        api_key: str | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        keepalive_s: float = 10.0,
        batcher: BatchingPlanner | None = None,
    ) -> None:
        self.ctx, self.runs, self.limits = ctx, runs, limits
        self.api_key = api_key or None
        self.model_name = model_name
        self.keepalive_s = keepalive_s
        self.batcher = batcher
        self.modes = available_modes(ctx)
        self.metrics = runs.metrics

    def register(self, app: FastAPI) -> None:
        app.add_exception_handler(ApiError, self.on_api_error)
        app.add_exception_handler(StarletteHTTPException, self.on_http_error)
        app.add_exception_handler(RequestValidationError, self.on_validation_error)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.get_metrics, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])

    # ------------------------------------------------------------------ errors
    async def on_api_error(self, request: Request, e: ApiError) -> JSONResponse:
        if e.status < 500:
            self.metrics.add(rejected=1)
        return JSONResponse(e.body(), status_code=e.status)

    async def on_http_error(self, request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind)
        return JSONResponse(err.body(), status_code=err.status)

    async def on_validation_error(self, request: Request, e: RequestValidationError) -> JSONResponse:
        err = _bad(str(e))
        return JSONResponse(err.body(), status_code=err.status)

    # ------------------------------------------------------------------ checks
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
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
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
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

    async def check_planner_fit(self, turn: Turn) -> None:
        """The request's planner settings suit the loaded planner (a block-causal planner's training blocks), and
        its conversation leaves room in the planner's context for the tokens it asks the planner to write."""
        from hybrid import prompts

        settings = turn.planner if turn.planner is not None else self.ctx.config.planner
        planner = self.ctx.planner
        mc = planner.model.config
        if mc.attention == "block_causal" and settings.block_length != mc.block_size:
            raise _bad(
                f"hybrid_planner.block_length={settings.block_length}, but this planner's block-causal attention was "
                f"trained on blocks of {mc.block_size}: use {mc.block_size} (or leave it out)",
                param="hybrid_planner.block_length",
            )
        diffusion = turn.mode == "diffusion"
        gen = settings.answer_length if diffusion else settings.gen_length  # as hybrid.runtime.sampler_config
        build = prompts.answer_messages if diffusion else prompts.plan_messages
        ids = await self.runs.run_in_pool(planner.encode, build(turn.question, turn.history))
        budget = planner.context_length - gen
        if len(ids) > budget:
            raise _bad(
                f"the conversation is {len(ids)} planner tokens; the planner's context leaves room for {budget} "
                f"({planner.context_length} minus the {gen} it would generate)",
                param="messages",
                code="context_length_exceeded",
            )

    # ------------------------------------------------------------------ routes
    async def health(self) -> dict[str, Any]:
        realizer = getattr(self.ctx.realizer, "name", None)
        return {
            "status": "ok",
            "model": self.model_name,
            "modes": list(self.modes),
            "active": self.metrics.active,
            "realizer": realizer,
        }

    async def get_metrics(self) -> dict[str, Any]:
        snap = self.metrics.snapshot()
        snap["planner_queued"] = self.batcher.queued if self.batcher is not None else 0
        return snap

    async def models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        card = {"id": self.model_name, "object": "model", "created": int(self.metrics.started_at), "owned_by": "hybrid"}
        return {"object": "list", "data": [card]}

    async def chat(self, request: Request):
        self.metrics.add(requests=1)
        self.check_key(request)
        req = parse_body(await self.read_body(request))
        turn = validate_request(
            req, limits=self.limits, config=self.ctx.config, modes=self.modes, model_names=(self.model_name,)
        )
        try:
            self.runs.admit()
        except Overloaded as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="server_overloaded") from None
        try:
            if turn.mode != "ar":
                await self.check_planner_fit(turn)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            inputs = {"question": turn.question, "mode": turn.mode, "history": turn.history}
            run = self.runs.submit(inputs, turn_context(self.ctx, turn), rid)
        except BaseException:
            self.runs.release()
            raise
        if turn.stream:
            return StreamingResponse(
                self.stream(run, turn),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": rid},
            )
        return await self.complete(run, turn, request)

    async def stream(self, run: Run, turn: Turn) -> AsyncIterator[str]:
        tr = StreamTranslator(
            run.rid, self.model_name, turn.mode, received=run.received, include_usage=turn.include_usage
        )
        try:
            for c in tr.open():
                yield _sse(c)
            async for kind, payload in run.events(self.keepalive_s):
                if kind == "ping":
                    yield ": keep-alive\n\n"
                    continue
                for c in tr.feed(kind, payload):
                    yield _sse(c)
                if kind == "error":
                    self.runs.finish(run, "failed")
                    log.warning("%s failed: %s", run.rid, tr.error.message)
                if tr.done:
                    yield "data: [DONE]\n\n"
                    if kind == "end":
                        self.runs.finish(run, "completed")
                    return
        finally:
            self.runs.abandon(run)  # a no-op after the last event; else the client left and this was cancelled

    async def complete(self, run: Run, turn: Turn, request: Request):
        state: dict[str, Any] = {}
        watcher = asyncio.ensure_future(_on_disconnect(request, lambda: self.runs.abandon(run)))
        try:
            async for kind, payload in run.events(self.keepalive_s):
                if kind == "values":
                    state = payload
                elif kind == "error":
                    err = run_error(payload)
                    self.runs.finish(run, "failed")
                    log.warning("%s failed: %s", run.rid, err.message)
                    return JSONResponse(err.body(), status_code=err.status)
                elif kind == "cancelled":  # nobody is listening any more
                    return JSONResponse({}, status_code=499)
        finally:
            watcher.cancel()
            self.runs.abandon(run)
        self.runs.finish(run, "completed")
        return completion_body(state, run.rid, self.model_name, turn.mode, received=run.received)


async def _on_disconnect(request: Any, callback, interval_s: float = 0.25) -> None:
    """Call `callback` once the client of a non-streamed request has gone (polled: Starlette only watches
    for disconnects while it streams)."""
    while not await request.is_disconnected():
        await asyncio.sleep(interval_s)
    callback()


# ============================================================================================ the app
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
    on_shutdown: Any = None,
) -> FastAPI:
    """The FastAPI app over `ctx` (built by `hybrid.runtime.build_context`, or by a test): `serving_context`
    wraps its models, a `RunManager` runs the graph, `Routes` answer HTTP. `api_key`: required as
    `Authorization: Bearer ...` on /v1/*. `max_active`: concurrent requests beyond it get 429. `on_shutdown`: called
    (in a thread) after the app stopped serving, e.g. to stop a realizer server started for it."""
    from hybrid.graph import build_graph

    metrics = Metrics()
    served, batcher = serving_context(
        ctx,
        metrics,
        fallback=fallback,
        fallback_retry_s=fallback_retry_s,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
    )
    limits = limits or Limits(max_content_chars=ctx.config.max_question_chars)
    ctx_limit = getattr(ctx.realizer, "context_length", None)
    if isinstance(ctx_limit, int) and ctx_limit > 0 and ctx_limit < limits.max_tokens:
        limits = dataclasses.replace(limits, max_tokens=ctx_limit)
    runs = RunManager(build_graph(), metrics=metrics, max_active=max_active, request_timeout_s=request_timeout_s)
    routes = Routes(
        served,
        runs,
        limits=limits,
        api_key=api_key,
        model_name=model_name,
        keepalive_s=keepalive_s,
        batcher=batcher,
    )

    @asynccontextmanager
    async def lifespan(app):
        runs.start()
        log.info("serving %s (modes: %s)", model_name, ", ".join(routes.modes))
        try:
            yield
        finally:
            if batcher is not None:  # first: planner calls waiting in the queue fail at once
                await asyncio.to_thread(batcher.close)
            await asyncio.to_thread(runs.close)
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.routes = routes
    routes.register(app)
    return app


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
    p.add_argument(
        "--vllm-local",
        action="store_true",
        help="realize through the local vLLM CPU server: start it (prepared by `hybrid vllm-local prepare`; one "
        "already running from the same directory and port is reused) and stop it on exit",
    )
    p.add_argument("--vllm-local-port", type=int, default=None, help="its port (default 8011)")
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
    from hybrid.cli import UserError, _err, _progress, config_from_args
    from hybrid.runtime import SetupError, build_context, share_cores

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    say = _progress(False)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    vllm = None
    try:
        cfg = config_from_args(args)
        modes = _load_modes(args.load_modes, cfg.mode)
        if args.vllm_local and modes & {"hybrid", "ar"}:
            vllm = start_vllm_local(args, say)
            cfg = vllm_local_config(cfg, vllm.base_url)
        ctx = build_context(cfg, say, modes=modes, embed_on_planner_thread=False)  # scoring never waits for plans
        share_cores(ctx)  # the planner takes every core while the realizer has nothing to decode
    except (UserError, SetupError, ValueError) as e:
        if vllm is not None:
            vllm.stop()
        _err(str(e))
        return 2
    # only a server this process started is stopped (`LocalVLLM.stop` leaves a reused one running); from the app's
    # shutdown, because uvicorn ends the process with the signal that stopped it (SIGTERM) once the app has stopped
    stop = vllm.stop if vllm is not None else None
    try:
        return _serve(args, cfg, ctx, say, on_shutdown=stop)
    finally:
        if stop is not None:
            stop()  # the app never started, or stopped without a signal (idempotent)


def start_vllm_local(args: argparse.Namespace, say):
    """Start (or reuse) the local vLLM CPU server of `realizers.local_vllm`; `SetupError` if it cannot."""
    from hybrid.runtime import SetupError
    from realizers.base import RealizerError
    from realizers.local_vllm import DEFAULT_PORT, LocalVLLM

    if args.realizer_url:
        raise SetupError("--vllm-local and --realizer-url both name a realizer server: pass one")
    lv = LocalVLLM(port=args.vllm_local_port or DEFAULT_PORT)
    say(f"starting the local vLLM server from {lv.dir} on port {lv.port} (~1 min) ...")
    try:
        lv.start()
    except RealizerError as e:
        raise SetupError(f"--vllm-local: {e}") from None
    return lv


def vllm_local_config(cfg, base_url: str):
    """`cfg` with the realizer pointed at the local vLLM server (its served model name)."""
    from realizers.local_vllm import SERVED_MODEL_NAME

    realizer = cfg.realizer.model_copy(update={"kind": "openai", "base_url": base_url, "model": SERVED_MODEL_NAME})
    return cfg.model_copy(update={"realizer": realizer})


def _serve(args: argparse.Namespace, cfg, ctx: HybridContext, say, on_shutdown=None) -> int:
    import uvicorn

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
        on_shutdown=on_shutdown,
    )
    say(f"listening on http://{args.host}:{args.port}/v1 (model {args.served_model_name!r})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
