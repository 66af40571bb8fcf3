"""The OpenAI chat-completions protocol as the hybrid server speaks it: request parsing and validation, error
bodies, and the pieces of a response built from the graph's final state.

    parse_body(raw) -> ChatRequest         JSON -> the fields of OpenAI's chat request this server reads
    validate_request(req, ...) -> Turn     fields and `Limits` checked; messages mapped to question + history
    planner_settings(obj, config)          a request's `hybrid_planner` object -> validated PlannerSettings
    ApiError / run_error(e)                OpenAI-style error bodies (`{"error": {...}}`) with their status
    _usage / _finish_reason                the `usage` object and `finish_reason` from the graph's state
    _plan_info / _done_info                the `hybrid` extension objects on the plan and finish chunks
    handed_over_score(state)               the score dict of the best draft (the one handed over, if accepted)
    _sse(obj)                              one server-sent event

Every check raises `ApiError` naming the parameter, before any model work. What it does not know: FastAPI,
HTTP transport, the graph or its models — it sees a request body, the config, and the graph's state as a dict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from hybrid.config import MODES, PLANNER_LOAD_FIELDS, HybridConfig, PlannerSettings
from realizers.base import RealizerError, RealizerHTTPError, RealizerTimeout, RealizerUnavailable

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
    hybrid_planner: dict[str, Any] | None = None  # planner sampling settings for this request (`planner_settings`)


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
    planner: PlannerSettings | None = None  # the request's planner settings (hybrid_planner); None = the server's


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
    planner = planner_settings(req.hybrid_planner, config) if req.hybrid_planner else None
    return Turn(question, turns[:-1], mode, max_tokens, temperature, top_p, req.stream, include_usage, planner)


# Sampling settings a request may not change although they are not load-time ones: a file path on the server
REQUEST_REFUSED: dict[str, str] = {"commit_policy": "it names a file on the server"}


def planner_request_fields() -> tuple[str, ...]:
    """The `hybrid_planner` keys a request may set: the planner's sampling settings."""
    return tuple(f for f in PlannerSettings.model_fields if f not in PLANNER_LOAD_FIELDS and f not in REQUEST_REFUSED)


def planner_settings(overrides: dict[str, Any], config: HybridConfig) -> PlannerSettings:
    """The server's planner settings with a request's `hybrid_planner` fields, validated as a config file's are
    (`PlannerSettings`, which builds the `SamplerConfig`). Load-time fields, unknown keys and invalid values are a
    400 naming `hybrid_planner.<field>`."""
    allowed = planner_request_fields()
    for key in overrides:
        param = f"hybrid_planner.{key}"
        if key in PLANNER_LOAD_FIELDS or key in REQUEST_REFUSED:
            why = REQUEST_REFUSED.get(key, "it is fixed when the server loads the planner")
            raise _bad(
                f"{param} cannot be set per request: {why}; set planner.{key} in the server's configuration",
                param=param,
                code="unsupported_parameter",
            )
        if key not in allowed:
            raise _bad(f"{param} is not a planner setting; allowed keys: {', '.join(allowed)}", param=param)
    try:
        return PlannerSettings.model_validate({**config.planner.model_dump(), **overrides})
    except ValidationError as e:
        messages, params = [], []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            named = re.match(r"planner\.(\w+)", msg)
            field = str(err["loc"][0]) if err["loc"] else (named.group(1) if named else None)
            msg = re.sub(r"\bplanner\.", "hybrid_planner.", msg)
            if field is not None and not msg.startswith(f"hybrid_planner.{field}"):
                msg = f"hybrid_planner.{field}: {msg}"
            messages.append(msg)
            params.append("hybrid_planner" if field is None else f"hybrid_planner.{field}")
        raise _bad("; ".join(messages), param=params[0]) from None


# ============================================================================================ responses
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


def handed_over_score(state: dict[str, Any]) -> dict[str, Any] | None:
    """The score dict of the best draft (the one handed to the realizer when accepted; in hybrid mode an
    unaccepted plan is not handed over, and this says why), else of the current draft."""
    best = state.get("best")
    if best is not None and best.get("score") is not None:
        return best["score"]
    return state.get("score")


def _done_info(state: dict[str, Any], server: dict[str, float]) -> dict[str, Any]:
    t = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in state.get("timings", {}).items()}
    t.pop("started_at", None)
    best = state.get("best")
    tse = best["tse"] if best is not None else state.get("tse")  # the best draft: the one handed on, if accepted
    return {
        "event": "done",
        "mode": state.get("mode"),
        "tse": tse,
        "revisions": state.get("revisions", 0),
        "accepted": state.get("accepted"),
        "score": handed_over_score(state),
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
