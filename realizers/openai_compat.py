"""Realizer over any OpenAI-compatible chat server (vLLM in production), through the `openai` async client.

Streams `/v1/chat/completions` and turns the chunks into `TextDelta`s and one final `Completion`:
- TTFT as `vllm bench serve` measures it: from sending the request to the first chunk whose delta has non-empty
  content (vLLM's first delta carries only the role);
- usage from the server's final usage chunk (`stream_options={"include_usage": True}`); a server that sends none
  (llama-cpp-python's) gets usage counted here, marked `Usage.source="local"`: with `tokenizer` when one is given,
  else completion tokens = content chunks and prompt tokens = 0 (unknown);
- fields only vLLM knows (`top_k`, `min_p`, `repetition_penalty`, `structured_outputs`, ...) go from
  `SamplingParams.extra` into `extra_body`;
- our own timeouts and retries (openai's defaults are 600 s and 2 retries); failures become `RealizerUnavailable`
  (refused, DNS, closed port), `RealizerTimeout`, `RealizerHTTPError` (with the status), or `RealizerError` (a
  stream cut off mid-way, an error event in the stream), each naming the URL and model;
- leaving the stream early (the consumer stops iterating, or its task is cancelled) closes the HTTP response,
  which makes vLLM abort the request.
This module knows no model and no tokenizer format beyond "has `apply_chat_template` or `encode`".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai

from realizers.base import (
    Completion,
    Message,
    RealizerError,
    RealizerHTTPError,
    RealizerTimeout,
    RealizerUnavailable,
    SamplingParams,
    StreamEvent,
    TextDelta,
    Usage,
    make_timings,
)
from realizers.server import openai_base


class OpenAIRealizer:
    """Streams chat completions from `base_url` (`http://host:port` or `.../v1`).

    `model=None` asks the server's `/v1/models` on first use and takes the first id. `timeout_s` bounds every
    wait on the server (connect excepted: `connect_timeout_s`), including the gap between two streamed chunks.
    `max_retries` applies only before a stream starts (connection errors, 408/409/429/5xx). `params` are the
    defaults for calls that pass none. `tokenizer` (optional) counts usage when the server sends none.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = "EMPTY",  # None -> the placeholder: the client requires a key, local servers ignore it
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 1,
        params: SamplingParams | None = None,
        tokenizer: Any = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.base_url = openai_base(base_url)
        self.model = model
        self.params = params or SamplingParams()
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client = client or openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or "EMPTY",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=max_retries,
        )

    @property
    def name(self) -> str:
        return f"openai:{self.model or '?'}@{self.base_url}"

    def _where(self) -> str:
        return f"{self.base_url}, model {self.model or '(first served)'}"

    async def resolve_model(self) -> str:
        """The model id requests use: the configured one, else the first one the server lists."""
        if self.model is None:
            try:
                page = await self._client.models.list()
            except openai.APIError as e:
                raise self._map_error(e) from e
            ids = [m.id for m in page.data]
            if not ids:
                raise RealizerUnavailable("the server serves no model", where=self.base_url)
            self.model = ids[0]
        return self.model

    def request_kwargs(self, model: str, messages: Sequence[Message], params: SamplingParams) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for one streamed request."""
        kw: dict[str, Any] = dict(
            model=model,
            messages=list(messages),
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
        )
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.seed is not None:
            kw["seed"] = params.seed
        if params.extra:
            kw["extra_body"] = dict(params.extra)
        return kw

    async def astream(
        self, messages: Sequence[Message], params: SamplingParams | None = None
    ) -> AsyncIterator[StreamEvent]:
        params = params or self.params
        model = await self.resolve_model()
        kwargs = self.request_kwargs(model, messages, params)
        parts: list[str] = []
        n_chunks = 0
        usage: Usage | None = None
        finish: str | None = None
        ttft: float | None = None
        t0 = time.perf_counter()
        stream = None
        try:
            stream = await self._client.chat.completions.create(**kwargs)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0, "server")
                for choice in chunk.choices or ():
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        parts.append(text)
                        n_chunks += 1
                        yield TextDelta(text)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        except openai.APIError as e:
            raise self._map_error(e) from e
        finally:
            if stream is not None:
                await stream.close()  # no-op after a complete read; aborts the request on early exit
        total = time.perf_counter() - t0
        if finish is None:
            raise RealizerError("stream ended before the model finished (no finish_reason)", where=self._where())
        text = "".join(parts)
        if usage is None:
            usage = self._local_usage(messages, text, n_chunks)
        yield Completion(text, usage, make_timings(ttft, total, usage.completion_tokens), finish)

    def _local_usage(self, messages: Sequence[Message], text: str, n_chunks: int) -> Usage:
        tok = self.tokenizer
        if tok is None:
            return Usage(0, n_chunks, "local")
        return Usage(_count_prompt(tok, messages), len(_encode(tok, text)), "local")

    def _map_error(self, e: openai.APIError) -> RealizerError:
        where = self._where()
        if isinstance(e, openai.APITimeoutError):
            err: RealizerError = RealizerTimeout(f"no answer within {self.timeout_s:g} s", where=where)
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            if _is_connect_failure(cause):
                err = RealizerUnavailable(f"cannot connect ({reason})", where=where)
            else:  # the connection broke after it was made: the server died or closed it mid-stream
                err = RealizerError(f"connection to the server lost ({reason})", where=where)
        elif isinstance(e, openai.APIStatusError):
            err = RealizerHTTPError(f"HTTP {e.status_code}: {_body_message(e)}", where=where, status_code=e.status_code)
        else:  # an error event inside the stream (vLLM sends one when the engine fails mid-request)
            err = RealizerError(f"server reported an error: {e.message}", where=where)
        return err

    async def aclose(self) -> None:
        await self._client.close()


def _is_connect_failure(cause: BaseException | None) -> bool:
    """True when the request never reached a server (refused, DNS, unreachable), as opposed to a cut stream."""
    while cause is not None:
        if type(cause).__name__ in ("ConnectError", "ConnectionRefusedError", "gaierror"):
            return True
        if isinstance(cause, (ConnectionRefusedError, OSError)) and getattr(cause, "errno", None) in (111, -2, -3):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _body_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        if isinstance(body.get("message"), str):
            return body["message"][:500]
    return str(e.message)[:500]


def _encode(tok: Any, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tok.encode(text))


def _count_prompt(tok: Any, messages: Sequence[Message]) -> int:
    if hasattr(tok, "apply_chat_template"):
        ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)
    return len(_encode(tok, "\n".join(m["content"] for m in messages)))
