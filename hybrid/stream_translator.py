"""The stream translator: one graph run's events in, OpenAI `chat.completion.chunk` objects out.

    tr = StreamTranslator(rid, model_name, mode, received=t0, include_usage=True)
    tr.open()                 the role chunk
    tr.feed(kind, payload)    one event of `graph.astream(..., stream_mode=["custom", "values"])` (or the run's
                              last event: "end", "error" with the exception) -> the chunks it becomes
    completion_body(...)      the non-streamed `chat.completion` from the final state

What a voice client sees, in order (it speaks only `delta.content`):

- `plan_block` events (a plan block became final while the planner runs) -> `delta.reasoning_content` = the
  block's new text, so the plan shows as it forms; `hybrid` = {event: "plan_block", block, plan_ms};
- `plan`, `score`, `revise` events -> an empty delta with a `hybrid` progress object (draft, score, revise);
- the realize stage -> an empty delta whose `hybrid` object (event "plan") carries the plan handed to the
  realizer (null when no draft was accepted: hybrid mode then answers unplanned), the best draft's `score`
  dict, TSE, revisions, NFE and timings, and `plan_revised` = true when a revision changed the plan (it
  differs from the first draft, which is what streamed as reasoning). If no plan blocks were streamed (a
  planner that reports none), the whole plan goes out here as `reasoning_content` instead, once;
- `token` events -> `delta.content`, whenever they arrive (diffusion mode streams the answer's finished blocks
  while it plans);
- "end" -> the finish chunk (`finish_reason`, `hybrid` timings), then the usage chunk if asked;
- "error" -> one `{"error": {...}}` object.

The caller writes each object as an SSE event and `data: [DONE]` after the last one. What it does not know:
HTTP, the run manager, or how events are produced — it sees event dicts and the graph's state as a dict.
"""

from __future__ import annotations

import time
from typing import Any

from hybrid.openai_protocol import _done_info, _finish_reason, _plan_info, _usage, handed_over_score, run_error


class StreamTranslator:
    """One streamed response. `feed` returns the chunk objects an event becomes (often none); `done` is set
    after "end" or "error"."""

    def __init__(
        self,
        rid: str,
        model_name: str,
        mode: str,
        *,
        received: float | None = None,
        include_usage: bool = False,
    ) -> None:
        self.rid, self.model_name, self.mode = rid, model_name, mode
        self.received = received if received is not None else time.time()
        self.created = int(self.received)
        self.include_usage = include_usage
        self.state: dict[str, Any] = {}
        self.reasoning = ""  # reasoning_content streamed so far (the plan as it formed)
        self.draft: str | None = None  # the first draft's text (the `plan` event)
        self.first_token: float | None = None
        self.error: Any = None  # the ApiError sent, after an "error" event
        self.done = False

    # ------------------------------------------------------------------ chunks
    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }

    def open(self) -> list[dict[str, Any]]:
        return [self.chunk({"role": "assistant", "content": ""})]

    # ------------------------------------------------------------------ events
    def feed(self, kind: str, payload: Any, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        if kind == "values":
            self.state = payload or {}
            return []
        if kind == "custom":
            return self._custom(payload, now)
        if kind == "error":
            self.done = True
            self.error = run_error(payload)
            return [self.error.body()]
        if kind == "end":
            self.done = True
            return self._finish(now)
        return []  # "cancelled" (nobody listens), keep-alive pings (the caller writes those)

    def _custom(self, ev: dict[str, Any], now: float) -> list[dict[str, Any]]:
        t = ev.get("type")
        if t == "token":
            if not ev.get("text"):
                return []
            if self.first_token is None:
                self.first_token = now
            return [self.chunk({"content": ev["text"]})]
        if t == "plan_block":
            delta = ev.get("delta") or ""
            if self.mode != "hybrid" or not delta:  # diffusion mode: the blocks are the answer (token events)
                return []
            self.reasoning += delta
            info = {"event": "plan_block", "block": ev.get("block"), "plan_ms": _ms(ev.get("plan_ms"))}
            return [self.chunk({"reasoning_content": delta}, hybrid=info)]
        if t == "status" and ev.get("stage") == "realize" and self.mode != "ar":
            return [self._realize(ev, now)]
        if t == "plan":
            if self.draft is None:
                self.draft = ev.get("text")
            info = {"event": "draft", "nfe": ev.get("nfe"), "plan_ms": _ms(ev.get("plan_ms"))}
            return [self.chunk({}, hybrid=info)]
        if t == "score":
            info = {
                "event": "score",
                "tse": ev.get("tse"),
                "accepted": ev.get("accepted"),
                "revision": ev.get("revision"),
            }
            return [self.chunk({}, hybrid=info)]
        if t == "revise":
            info = {"event": "revise", "revision": ev.get("revision"), "positions": ev.get("positions")}
            return [self.chunk({}, hybrid=info)]
        return []

    def _realize(self, ev: dict[str, Any], now: float) -> dict[str, Any]:
        plan = ev.get("plan")
        info = _plan_info(self.state, ev, (now - self.received) * 1000)
        info["plan"] = plan
        info["score"] = handed_over_score(self.state)
        drafted = self.draft if self.draft is not None else self.reasoning or None
        info["plan_revised"] = bool(plan is not None and drafted is not None and plan.strip() != drafted.strip())
        if plan and not self.reasoning:  # nothing streamed while planning: the plan goes out once, here
            self.reasoning = plan
            return self.chunk({"reasoning_content": plan}, hybrid=info)
        return self.chunk({}, hybrid=info)

    def _finish(self, now: float) -> list[dict[str, Any]]:
        server = {"server_total_ms": round((now - self.received) * 1000, 1)}
        if self.first_token is not None:
            server["server_ttft_ms"] = round((self.first_token - self.received) * 1000, 1)
        out = [self.chunk({}, _finish_reason(self.state), hybrid=_done_info(self.state, server))]
        if self.include_usage:
            out.append({**self.chunk({}), "choices": [], "usage": _usage(self.state)})
        return out


def completion_body(
    state: dict[str, Any], rid: str, model_name: str, mode: str, *, received: float, now: float | None = None
) -> dict[str, Any]:
    """The non-streamed `chat.completion`: `message.reasoning_content` is the plan handed to the realizer
    (hybrid mode), `hybrid` the finish object with the server's total time."""
    now = time.time() if now is None else now
    server = {"server_total_ms": round((now - received) * 1000, 1)}
    plan = state.get("plan") if mode == "hybrid" else None
    message = {"role": "assistant", "content": state.get("answer", ""), "reasoning_content": plan}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(received),
        "model": model_name,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(state)}],
        "usage": _usage(state),
        "hybrid": _done_info(state, server),
    }


def _ms(value: Any) -> float | None:
    return round(float(value), 1) if value is not None else None
