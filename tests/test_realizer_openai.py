"""OpenAIRealizer against the real vLLM server (CPU build, SmolLM2-135M-Instruct), started by realizers.local_vllm.

The venv comes from `python -m realizers.local_vllm prepare` (`.ci/prepare_vllm.sh`); its location is env
`HYBRID_VLLM_VENV` (default `~/.cache/hybrid/vllm-venv`). Unprepared, the vLLM tests skip, unless
`HYBRID_REQUIRE_VLLM=1` (CI), where they fail. One server (~45 s to start) serves the whole module; the test
that kills it runs last.
The tests without the `vllm` marker need no server and always run: a closed port, a silent socket, and an
in-memory transport for what vLLM never does (no usage chunk, a stream cut short, an error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time

import httpx
import httpx2
import openai
import pytest

from realizers.base import (
    Completion,
    RealizerError,
    RealizerHTTPError,
    RealizerTimeout,
    RealizerUnavailable,
    SamplingParams,
    TextDelta,
)
from realizers.local_vllm import SERVED_MODEL_NAME, LocalVLLM, default_dir
from realizers.openai_compat import OpenAIRealizer
from realizers.server import api_root

LONG = [{"role": "user", "content": "Write a long story about a fox who learns to sail. Use many details."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm():
    lv = LocalVLLM(dir=default_dir(), port=_free_port())
    if not lv.prepared():
        msg = f"local vLLM not prepared in {lv.dir}: run `bash .ci/prepare_vllm.sh` (or set HYBRID_VLLM_VENV)"
        if os.environ.get("HYBRID_REQUIRE_VLLM") == "1":
            pytest.fail(msg + " — required because HYBRID_REQUIRE_VLLM=1")
        pytest.skip(msg)
    lv.start(timeout_s=300)
    yield lv
    lv.stop()


def _realizer(lv: LocalVLLM, **kw) -> OpenAIRealizer:
    kw.setdefault("timeout_s", 30.0)
    return OpenAIRealizer(lv.base_url, kw.pop("model", SERVED_MODEL_NAME), **kw)


async def _collect(r: OpenAIRealizer, messages, params):
    events = [ev async for ev in r.astream(messages, params)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    finals = [e for e in events if isinstance(e, Completion)]
    assert len(finals) == 1 and events[-1] is finals[0]
    return deltas, finals[0]


def _running_requests(lv: LocalVLLM) -> float:
    text = httpx.get(f"{api_root(lv.base_url)}/metrics", timeout=5).text
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
    assert vals, "vLLM exposes no vllm:num_requests_running metric"
    return sum(vals)


# ----------------------------------------------------------------------------- needs no server


async def test_closed_port_is_unavailable_within_timeout():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    r = OpenAIRealizer(url, "m", connect_timeout_s=2.0, timeout_s=2.0, max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(RealizerUnavailable) as e:
        await _collect(r, LONG, SamplingParams(max_tokens=4))
    assert time.perf_counter() - t0 < 3.0
    assert url in str(e.value) and "model m" in str(e.value)
    await r.aclose()


async def test_silent_server_times_out():
    """A socket that accepts connections but never answers: RealizerTimeout after timeout_s, not a hang."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        r = OpenAIRealizer(url, "m", timeout_s=1.0, max_retries=0)
        t0 = time.perf_counter()
        with pytest.raises(RealizerTimeout) as e:
            await _collect(r, LONG, SamplingParams(max_tokens=4))
        assert time.perf_counter() - t0 < 3.0
        assert url in str(e.value)
        await r.aclose()


def _sse_client(chunks: list[dict | str], seen: list[dict]) -> openai.AsyncOpenAI:
    """An openai client whose transport answers every request with these SSE events (no server involved)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        body = "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return openai.AsyncOpenAI(base_url="http://fake/v1", api_key="x", http_client=http, max_retries=0)


def _chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text)


async def test_usage_counted_locally_when_the_server_sends_none():
    """What llama-cpp-python's server does (vLLM always sends usage): count here, say so with source="local"."""
    chunks = [_chunk(role="assistant"), _chunk("Hel"), _chunk("lo"), _chunk(finish="stop"), "[DONE]"]
    seen: list[dict] = []
    r = OpenAIRealizer("http://fake", "m", client=_sse_client(chunks, seen))
    p = SamplingParams(max_tokens=9, stop=["x"], extra={"top_k": 3, "structured_outputs": {"choice": ["a"]}})
    deltas, c = await _collect(r, [{"role": "user", "content": "hi"}], p)
    assert [d.text for d in deltas] == ["Hel", "lo"] and c.text == "Hello" and c.finish_reason == "stop"
    assert (c.usage.source, c.usage.prompt_tokens, c.usage.completion_tokens) == ("local", 0, 2)
    body = seen[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["top_k"] == 3 and body["structured_outputs"] == {"choice": ["a"]} and body["stop"] == ["x"]

    r = OpenAIRealizer("http://fake", "m", client=_sse_client(chunks, []), tokenizer=_CharTokenizer())
    _, c = await _collect(r, [{"role": "user", "content": "hi"}], p)
    assert (c.usage.source, c.usage.prompt_tokens, c.usage.completion_tokens) == ("local", 2, 5)


async def test_stream_cut_short_or_error_event_is_an_error():
    r = OpenAIRealizer("http://fake", "m", client=_sse_client([_chunk(role="assistant"), _chunk("Hel")], []))
    with pytest.raises(RealizerError, match="before the model finished"):
        await _collect(r, LONG, SamplingParams(max_tokens=4))
    err = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    r = OpenAIRealizer("http://fake", "m", client=_sse_client([_chunk("Hel"), err], []))
    with pytest.raises(RealizerError, match="engine died"):
        await _collect(r, LONG, SamplingParams(max_tokens=4))


# ----------------------------------------------------------------------------- the real vLLM server


@pytest.mark.vllm
async def test_streams_pieces_with_server_usage(vllm):
    r = _realizer(vllm, model=None)  # None: the first model the server lists
    deltas, c = await _collect(r, LONG, SamplingParams(max_tokens=40, extra={"top_k": 20, "repetition_penalty": 1.05}))
    assert r.model == SERVED_MODEL_NAME
    assert len(deltas) >= 5 and c.text == "".join(d.text for d in deltas) and c.text.strip()
    assert c.usage.source == "server" and c.usage.prompt_tokens > 10 and 0 < c.usage.completion_tokens <= 40
    assert 0 < c.timings.ttft_s < c.timings.total_s and c.timings.tokens_per_s > 1
    assert c.finish_reason in ("stop", "length")
    await r.aclose()


@pytest.mark.vllm
async def test_max_tokens_and_stop(vllm):
    r = _realizer(vllm)
    _, c = await _collect(r, LONG, SamplingParams(max_tokens=6))
    assert c.usage.completion_tokens == 6 and c.finish_reason == "length"

    _, full = await _collect(r, LONG, SamplingParams(max_tokens=40))
    words = full.text.split()
    assert len(words) > 8
    stop = words[len(words) // 2]
    _, cut = await _collect(r, LONG, SamplingParams(max_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    await r.aclose()


@pytest.mark.vllm
async def test_http_error_carries_status_and_url(vllm):
    r = _realizer(vllm, model="no-such-model")
    with pytest.raises(RealizerHTTPError) as e:
        await _collect(r, LONG, SamplingParams(max_tokens=4))
    assert e.value.status_code == 404 and vllm.base_url in str(e.value) and "no-such-model" in str(e.value)
    await r.aclose()


@pytest.mark.vllm
async def test_leaving_the_stream_aborts_the_request(vllm):
    r = _realizer(vllm)
    n, seen_running = 0, False
    async with contextlib.aclosing(r.astream(LONG, SamplingParams(max_tokens=1000))) as stream:
        async for _ev in stream:
            n += 1
            # the gauge is published with the engine's stats, which can trail the first chunks: read it until
            # it shows the request (a 1000-token stream leaves seconds for that), then leave the stream
            if n >= 3 and _running_requests(vllm) == 1:
                seen_running = True
                break
    assert seen_running, f"vllm:num_requests_running never showed the request in {n} streamed events"
    deadline = time.monotonic() + 5
    while _running_requests(vllm) != 0:  # vLLM aborts the request once the HTTP stream is closed
        assert time.monotonic() < deadline, "vLLM still generates after the client closed the stream"
        await asyncio.sleep(0.1)

    first = asyncio.Event()

    async def consume():
        async for _ev in r.astream(LONG, SamplingParams(max_tokens=1000)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while _running_requests(vllm) != 0:
        assert time.monotonic() < deadline, "vLLM still generates after the consuming task was cancelled"
        await asyncio.sleep(0.1)
    await r.aclose()


@pytest.mark.vllm
async def test_stalled_stream_times_out(vllm):
    """SIGSTOP the API server mid-stream: no more bytes arrive, so the read timeout fires (then SIGCONT).

    The 1.5 s timeout also bounds the wait for the response's first byte, which a CPU server busy with the
    previous test's aborts can exceed; such an attempt says nothing about a stall and is tried again."""
    r = _realizer(vllm, timeout_s=1.5, max_retries=0)
    for _attempt in range(3):
        n = 0
        t_stop = None
        with pytest.raises(RealizerTimeout):
            try:
                async for _ev in r.astream(LONG, SamplingParams(max_tokens=1000)):
                    n += 1
                    if n == 2:
                        os.kill(vllm.proc.pid, signal.SIGSTOP)
                        t_stop = time.monotonic()
            finally:
                os.kill(vllm.proc.pid, signal.SIGCONT)
        if t_stop is not None:
            break
        await asyncio.sleep(2.0)
    assert t_stop is not None, f"every attempt timed out before its stream started ({n} events in the last)"
    assert time.monotonic() - t_stop < 6.0, f"the timeout came {time.monotonic() - t_stop:.1f} s after the stop"
    await r.aclose()


@pytest.mark.vllm
async def test_zz_server_killed_mid_stream_is_a_clear_error(vllm):
    """Runs last: it kills the module's server. A dead server must end the stream with a RealizerError fast,
    well before the 30 s read timeout (so it is the broken connection that ends it, not a timeout)."""
    r = _realizer(vllm, timeout_s=30.0)
    n = 0
    killed_at = None
    with pytest.raises(RealizerError) as e:
        async for _ev in r.astream(LONG, SamplingParams(max_tokens=1000)):
            n += 1
            if n == 3:
                os.killpg(os.getpgid(vllm.proc.pid), signal.SIGKILL)  # the API server and its engine process
                killed_at = time.monotonic()
    assert killed_at is not None and time.monotonic() - killed_at < 5.0
    assert not isinstance(e.value, RealizerTimeout)
    assert vllm.base_url in str(e.value) and SERVED_MODEL_NAME in str(e.value)
    await r.aclose()
