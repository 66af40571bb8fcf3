"""The OpenAI-compatible server (`hybrid.server`), run for real on loopback: uvicorn on a free port, the real
graph, a tiny random block-causal planner with SmolLM2's tokenizer, and the packaged SmolLM2 realizer in
process. The upstream-fault test runs a second real server as the realizer: `hybrid serve --mode ar` in a
subprocess (the embedded SmolLM2 behind the same HTTP API), killed with SIGKILL mid-run and restarted.

Bounded: max_tokens 8 for the load test, every wait has a deadline, the whole module runs in about a minute or
two on 2 shared cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from hybrid.config import HybridConfig
from hybrid.server import BatchingPlanner, Limits, Metrics, create_app
from hybrid.state import HybridContext

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTION = "How do I make a cup of tea?"
LONG_QUESTION = "Write a long story about a fox who learns to sail. Use many details."
REPO = Path(__file__).resolve().parents[1]


# ============================================================================================ helpers
def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, so two calls in a row cannot hand
    out the same port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 from a background thread (its own event loop)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=3)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics", timeout=5).json()

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=5).status_code == 200


def make_ctx(planner, realizer, **overrides) -> HybridContext:
    base = {
        "planner.gen_length": 16,
        "planner.steps": 16,
        "planner.block_length": 8,
        "realizer.max_tokens": 8,
        "score.clusterer": "exact",
        "revise.max_revisions": 1,
    }
    base.update(overrides)
    return HybridContext(config=HybridConfig.load(**base), planner=planner, realizer=realizer)


def body(question: str = QUESTION, **extra) -> dict:
    return {"model": "hybrid", "messages": [{"role": "user", "content": question}], "max_tokens": 8, **extra}


def parse_sse(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def content_of(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices") and "delta" in e["choices"][0]
    )


async def stream_once(client: httpx.AsyncClient, url: str, payload: dict) -> list:
    payload = {**payload, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=HEADERS) as r:
        assert r.status_code == 200, await r.aread()
        return parse_sse((await r.aread()).decode())


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ============================================================================================ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The planner worker shares 2 cores with the realizer's decode thread (and other jobs): 1 intra-op
    thread is ~1.5x faster here than 2. Restored for the modules that follow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planner(tiny_planner):
    """The tiny planner with a prefix KV cache (the shared fixture's sampler is left as it is)."""
    import dataclasses

    from planners.planner import Planner

    cfg = dataclasses.replace(tiny_planner.sampler, cache="prefix")
    return Planner(tiny_planner.model, tiny_planner.tokenizer, cfg, name="tiny-prefix")


@pytest.fixture(scope="module")
def served(planner, smol_realizer):
    ctx = make_ctx(planner, smol_realizer)
    app = create_app(ctx, api_key=KEY, limits=Limits(max_body_bytes=64_000), max_batch=32)
    with ThreadServer(app) as srv:
        yield srv


# ============================================================================================ API surface
def test_health_models_and_api_key(served):
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    r = httpx.get(f"{served.url}/v1/models", headers=HEADERS)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "hybrid"
    for headers, msg in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "incorrect API key")):
        r = httpx.post(f"{served.url}/v1/chat/completions", json=body(), headers=headers)
        assert r.status_code == 401
        err = r.json()["error"]
        assert msg in err["message"] and err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert set(err) == {"message", "type", "param", "code"}
    assert served.healthy()


@pytest.mark.parametrize(
    "payload, status, param, needle",
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"messages": []}, 400, "messages", "non-empty"),
        ({"max_tokens": 8}, 400, "messages", "Field required"),
        (body(max_tokens=10**9), 400, "max_tokens", "out of range"),
        (body(max_tokens=0), 400, "max_tokens", "out of range"),
        (body(temperature=7), 400, "temperature", "out of range"),
        (body(max_tokens="lots"), 400, "max_tokens", "valid integer"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "not supported"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages", "empty"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "last message"),
        ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "messages.0.content", "limit"),
        ({"messages": [{"role": "user", "content": "hi"}] * 200}, 400, "messages", "limit"),
        (body(n=3), 400, "n", "n must be 1"),
        (body(hybrid_mode="telepathy"), 400, "hybrid_mode", "not valid"),
        (body(model="gpt-5"), 404, "model", "does not exist"),
        ({"messages": [{"role": "user", "content": "y" * 70_000}]}, 413, None, "limit"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_stays_up(served, payload, status, param, needle):
    kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = httpx.post(f"{served.url}/v1/chat/completions", headers={**HEADERS, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert err["param"] == param and err["type"] in ("invalid_request_error", "not_found_error")
    assert served.healthy()


# ============================================================================================ answers
def test_non_streamed_answer_carries_plan_usage_and_timings(served):
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body(), headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    msg = d["choices"][0]["message"]
    assert d["object"] == "chat.completion" and msg["role"] == "assistant"
    assert msg["content"]
    h = d["hybrid"]
    if h["accepted"]:
        assert msg["reasoning_content"]  # the plan handed to the realizer, beside the answer
    else:  # an untrusted plan is not handed over: the realizer answered alone, and says so
        assert msg["reasoning_content"] is None and any("not accepted" in w for w in h["warnings"])
    assert d["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < d["usage"]["completion_tokens"] <= 8
    assert d["usage"]["total_tokens"] == d["usage"]["prompt_tokens"] + d["usage"]["completion_tokens"]
    assert h["mode"] == "hybrid" and h["tse"] is not None and h["revisions"] in (0, 1)
    assert h["timings"]["plan_ms"] > 0 and h["timings"]["ttft_ms"] >= h["timings"]["plan_ms"]


def test_openai_client_streams_plan_as_reasoning_then_content(served):
    async def go():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        chunks = []
        stream = await client.chat.completions.create(
            model="hybrid",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for c in stream:
            chunks.append(c)
        ar = await client.chat.completions.create(
            model="hybrid",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            extra_body={"hybrid_mode": "ar"},
        )
        await client.close()
        return chunks, ar

    chunks, ar = asyncio.run(go())
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, reasoning = [], ""  # what a voice client sees: reasoning (the plan as it forms) first, then content
    for c in chunks:
        if c.choices and (c.choices[0].delta.model_extra or {}).get("reasoning_content"):
            kinds.append("plan")
            reasoning += c.choices[0].delta.model_extra["reasoning_content"]
        elif c.choices and c.choices[0].delta.content:
            kinds.append("content")
    assert kinds[0] == "plan" and "content" in kinds
    assert "plan" not in kinds[kinds.index("content") :]
    (plan_chunk,) = [c for c in chunks if (c.model_extra.get("hybrid") or {}).get("event") == "plan"]
    info = plan_chunk.model_extra["hybrid"]
    assert info["nfe"] > 0 and info["plan_ms"] > 0 and "tse" in info and "value" in info["score"]
    # the plan handed to the realizer travels in the hybrid object: what streamed as reasoning, unless a revision
    # changed it; none when no draft was accepted (the realizer then answers alone)
    if info["plan"] is not None:
        assert reasoning.strip() == info["plan"].strip() or info["plan_revised"]
    else:
        assert info["accepted"] is False
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["hybrid"]["timings"]["server_ttft_ms"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage: the last chunk
    # per-request mode: ar answers without a plan
    assert ar.choices[0].message.content and ar.choices[0].message.model_extra.get("reasoning_content") is None
    assert ar.model_extra["hybrid"]["mode"] == "ar"


@pytest.mark.parametrize("commit", ["static", "threshold"])
def test_batched_plans_equal_solo_plans(planner, commit):
    """Rows denoised together get the tokens, trajectory and NFE they get alone: with counted commits (rows in
    lockstep) and with threshold commits, where these rows need 16, 15 and 15 steps alone (so in a batch the
    shorter ones wait a step, which must not show in their trajectories)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from hybrid import prompts

    cfg = dataclasses.replace(planner.sampler, commit=commit, threshold=0.02)
    questions = ["Hi", QUESTION, "Explain in detail how a bicycle gear system works, please."]
    solo = [planner.plan(prompts.plan_messages(q), config=cfg) for q in questions]
    if commit == "threshold":
        assert len({len(r.trajectory.steps) for r in solo}) > 1
    metrics = Metrics()
    batcher = BatchingPlanner(planner, max_batch=8, window_s=0.3, metrics=metrics)
    try:
        with ThreadPoolExecutor(len(questions)) as pool:
            batched = list(pool.map(lambda q: batcher.plan(prompts.plan_messages(q), config=cfg), questions))
        assert metrics.plan_max_batch == len(questions)  # one batch
        # the revise loop's redraw: a few positions of each plan remasked and denoised again, batched too
        positions = [[0, 3], [5, 6, 7, 8], [15]]
        solo_redraws = [planner.redraw(r, p, config=cfg) for r, p in zip(solo, positions, strict=True)]
        with ThreadPoolExecutor(len(questions)) as pool:
            args = zip(batched, positions, strict=True)
            batched_redraws = list(pool.map(lambda a: batcher.redraw(*a, config=cfg), args))
        assert metrics.plan_batches == 2
    finally:
        batcher.close()
    for a, b in zip(solo + solo_redraws, batched + batched_redraws, strict=True):
        assert (a.text, a.tokens, a.span) == (b.text, b.tokens, b.span)
        assert [s.x0_hat for s in a.trajectory.steps] == [s.x0_hat for s in b.trajectory.steps]
        assert [s.committed for s in a.trajectory.steps] == [s.committed for s in b.trajectory.steps]
        assert a.stats["nfe"] == b.stats["nfe"] and b.stats["batch_size"] == len(questions)


def test_batched_plans_report_the_blocks_solo_plans_report(planner):
    """`on_block` through the batching planner: each row is told of its finished blocks exactly as the same
    plan drafted alone tells them (the plan node streams these as `plan_block` events)."""
    from concurrent.futures import ThreadPoolExecutor

    from hybrid import prompts

    questions = ["Hi", QUESTION, "Explain in detail how a bicycle gear system works, please."]

    def drafted(plan_fn, q):
        seen = []
        result = plan_fn(prompts.plan_messages(q), on_block=lambda p: seen.append(p) and None)
        return result, [(p.block, p.text, p.delta, p.tokens, p.ended) for p in seen]

    solo = [drafted(planner.plan, q) for q in questions]
    batcher = BatchingPlanner(planner, max_batch=8, window_s=0.3)
    try:
        with ThreadPoolExecutor(len(questions)) as pool:
            batched = list(pool.map(lambda q: drafted(batcher.plan, q), questions))
    finally:
        batcher.close()
    assert batcher.metrics.plan_max_batch == len(questions)
    for (a, a_blocks), (b, b_blocks) in zip(solo, batched, strict=True):
        assert a.text == b.text and a_blocks == b_blocks and a_blocks
        assert a_blocks[-1][1] == a.text  # the last block's text is the plan


# ============================================================================================ load
def test_32_concurrent_streams_all_complete(served):
    before = served.metrics()
    n = 32

    async def go():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=httpx.Timeout(150.0), limits=limits) as client:
            qs = [f"{QUESTION} (variant {i})" for i in range(n)]
            return await asyncio.gather(*(stream_once(client, served.url, body(q)) for q in qs))

    t0 = time.monotonic()
    results = asyncio.run(go())
    elapsed = time.monotonic() - t0
    for events in results:
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events), events
        assert content_of(events).strip()
        finish = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
        assert len(finish) == 1
    after = served.metrics()
    assert after["completed"] - before["completed"] == n and after["failed"] == before["failed"]
    assert after["active"] == 0
    assert after["plan_max_batch"] > 1  # concurrent plans were denoised together
    print(f"\n32 streams in {elapsed:.1f} s; planner batches: max {after['plan_max_batch']}")
    assert served.healthy()


def test_client_disconnect_cancels_its_run(served):
    before = served.metrics()["cancelled"]
    payload = body(LONG_QUESTION, max_tokens=400)
    with httpx.Client(timeout=60) as client:
        streamed = {**payload, "stream": True}
        with client.stream("POST", f"{served.url}/v1/chat/completions", json=streamed, headers=HEADERS) as r:
            for line in r.iter_lines():  # leave as soon as the answer starts
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    break
    wait_for(lambda: served.metrics()["cancelled"] == before + 1, 15, "the streamed run to be cancelled")
    # a non-streamed client that gives up (read timeout) is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=payload, headers=HEADERS, timeout=1.0)
    wait_for(lambda: served.metrics()["cancelled"] == before + 2, 15, "the non-streamed run to be cancelled")
    wait_for(lambda: served.metrics()["active"] == 0, 15, "no run left active")
    # the realizer was released: a new request completes promptly
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body(), headers=HEADERS, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# ============================================================================================ upstream faults
class Upstream:
    """`hybrid serve --mode ar` (embedded SmolLM2) as a real OpenAI-compatible realizer server."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log, self.proc = port, log, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        from realizers.server import launch, wait_ready

        env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRID_")}
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, "-m", "hybrid.cli", "serve", "--mode", "ar", "--port", str(self.port)]
        self.proc = launch(cmd + ["--log-level", "warning"], env=env, log_path=self.log)
        wait_ready(self.url, timeout_s=120, proc=self.proc, log_path=self.log)

    def kill(self) -> None:
        os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_realizer_server_killed_mid_run(planner, smol_realizer, tmp_path):
    from realizers.openai_compat import OpenAIRealizer

    up = Upstream(free_port(), tmp_path / "upstream.log")
    up.start()

    def remote():
        return OpenAIRealizer(up.url, None, timeout_s=30, connect_timeout_s=2, max_retries=0)

    over = {"realizer.kind": "openai", "realizer.base_url": up.url}
    app_b = create_app(make_ctx(planner, remote(), **over), api_key=KEY)  # no fallback
    ar_ctx = HybridContext(config=make_ctx(None, None, mode="ar", **over).config, realizer=remote())
    app_c = create_app(ar_ctx, api_key=KEY, fallback=smol_realizer, fallback_retry_s=1.0)
    try:
        with ThreadServer(app_b) as b, ThreadServer(app_c) as c:

            async def streams(url, payloads, on_first_content=None):
                async with httpx.AsyncClient(timeout=60) as client:

                    async def one(p):
                        p = {**p, "stream": True}
                        events, fired = [], False
                        async with client.stream("POST", f"{url}/v1/chat/completions", json=p, headers=HEADERS) as r:
                            assert r.status_code == 200
                            async for line in r.aiter_lines():
                                if line.startswith("data: "):
                                    events.extend(parse_sse(line))
                                    if on_first_content and not fired and content_of(events):
                                        fired = True
                                        on_first_content()
                        return events

                    return await asyncio.gather(*(one(p) for p in payloads))

            # healthy upstream: the hybrid server answers through it
            (ok,) = asyncio.run(streams(b.url, [body()]))
            assert content_of(ok) and ok[-1] == "[DONE]" and not any("error" in e for e in ok if isinstance(e, dict))

            # killed mid-run: both in-flight requests end with an error event in the stream, then [DONE]
            killed = threading.Event()

            def kill_once():
                if not killed.is_set():
                    killed.set()
                    up.kill()

            long = body(LONG_QUESTION, max_tokens=300)
            results = asyncio.run(streams(b.url, [long, long], on_first_content=kill_once))
            assert killed.is_set()
            for events in results:
                errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
                assert len(errors) == 1 and events[-1] == "[DONE]", events[-3:]
                assert errors[0]["type"] == "server_error" and "realizer" in errors[0]["message"]
                print("\nmid-run error event:", errors[0])
            assert b.healthy() and c.healthy()

            # while it is down: a clear error without fallback; the fallback answers where one is configured
            (down,) = asyncio.run(streams(b.url, [body()]))
            err = next(e["error"] for e in down if isinstance(e, dict) and "error" in e)
            assert err["code"] == "realizer_unavailable" and "cannot connect" in err["message"]
            print("while down:", err)
            r = httpx.post(f"{c.url}/v1/chat/completions", json=body(), headers=HEADERS, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
            assert c.metrics()["fallbacks"] == 1

            # back up: new requests succeed through it again (the fallback is no longer used)
            up.start()
            (again,) = asyncio.run(streams(b.url, [body()]))
            assert content_of(again) and not any("error" in e for e in again if isinstance(e, dict))
            time.sleep(1.0)  # the fallback's retry window
            r = httpx.post(f"{c.url}/v1/chat/completions", json=body(), headers=HEADERS, timeout=60)
            assert r.status_code == 200 and c.metrics()["fallbacks"] == 1
            assert b.metrics()["failed"] == 3 and b.metrics()["active"] == 0
    finally:
        if up.proc is not None and up.proc.poll() is None:
            up.kill()


# ============================================================================================ parts of the app
def test_app_leaves_the_serving_loops_default_executor_alone(planner):
    """Graph runs get the run manager's own pool; the loop that serves HTTP keeps its default executor (it may
    belong to an app this one is mounted in)."""
    app = create_app(make_ctx(planner, None, mode="diffusion"), api_key=KEY)

    async def go():
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        mine = ThreadPoolExecutor(2, thread_name_prefix="the-hosts-pool")
        loop.set_default_executor(mine)
        async with app.router.lifespan_context(app):
            runs = app.state.routes.runs
            assert loop._default_executor is mine and runs.executor is not mine and runs.loop is not loop
        assert loop._default_executor is mine  # still the host's, and still usable after the app stopped
        name = await asyncio.to_thread(lambda: threading.current_thread().name)
        assert name.startswith("the-hosts-pool")

    asyncio.run(go())


def test_diffusion_mode_streams_content_while_it_plans(served):
    """Diffusion mode over SSE: the answer's finished blocks arrive as content before the realize stage."""

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            return await stream_once(client, served.url, body(hybrid_mode="diffusion"))

    events = asyncio.run(go())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    first_content = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content"))
    realize = next(i for i, c in enumerate(chunks) if (c.get("hybrid") or {}).get("event") == "plan")
    assert first_content < realize
    assert not any(c["choices"] and c["choices"][0]["delta"].get("reasoning_content") for c in chunks)


# ============================================================================================ --vllm-local
def _serve_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRID_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def test_vllm_local_config_points_the_realizer_at_the_server():
    from hybrid.server import vllm_local_config
    from realizers.local_vllm import SERVED_MODEL_NAME

    cfg = vllm_local_config(HybridConfig.load(), "http://127.0.0.1:8011/v1")
    assert (cfg.realizer.kind, cfg.realizer.base_url, cfg.realizer.model) == (
        "openai",
        "http://127.0.0.1:8011/v1",
        SERVED_MODEL_NAME,
    )


@pytest.mark.parametrize(
    "extra, needle",
    [([], "local_vllm prepare"), (["--realizer-url", "http://127.0.0.1:9/v1"], "pass one")],
    ids=["unprepared", "two-realizers"],
)
def test_serve_vllm_local_fails_clearly(tmp_path, extra, needle):
    import subprocess

    cmd = [sys.executable, "-m", "hybrid.cli", "serve", "--vllm-local", "--mode", "ar", "--port", str(free_port())]
    env = _serve_env(HYBRID_VLLM_VENV=str(tmp_path / "no-venv"))
    r = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]


@pytest.mark.vllm
def test_serve_vllm_local_realizes_through_local_vllm(tmp_path):
    """`hybrid serve --vllm-local --mode ar`: starts the prepared vLLM CPU server, answers through it (streamed and
    not), and stops it on exit."""
    from realizers.local_vllm import LocalVLLM, default_dir
    from realizers.server import launch, terminate, wait_ready

    vllm_port, port = free_ports(2)
    lv = LocalVLLM(dir=default_dir(), port=vllm_port)
    if not lv.prepared():
        msg = f"local vLLM not prepared in {lv.dir}: run `bash .ci/prepare_vllm.sh` (or set HYBRID_VLLM_VENV)"
        if os.environ.get("HYBRID_REQUIRE_VLLM") == "1":
            pytest.fail(msg + " — required because HYBRID_REQUIRE_VLLM=1")
        pytest.skip(msg)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "hybrid.cli", "serve", "--vllm-local", "--vllm-local-port", str(lv.port)]
    cmd += ["--mode", "ar", "--port", str(port), "--log-level", "warning"]
    proc = launch(cmd, env=_serve_env(HYBRID_VLLM_VENV=str(lv.dir)), log_path=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/v1", timeout_s=420, proc=proc, log_path=log)
        assert lv.running_pid() is not None  # the serve process started it
        r = httpx.get(f"{url}/health", timeout=5)
        assert r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"), (
            f"{url}/health answered {r.status_code} {r.text!r}, not the hybrid server's JSON; serve log:\n"
            + log.read_text()[-3000:]
        )
        health = r.json()
        assert health["realizer"] == f"openai:smollm2@{lv.base_url}" and health["modes"] == ["ar"]
        r = httpx.post(f"{url}/v1/chat/completions", json=body(hybrid_mode="ar"), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] > 0

        async def go():
            async with httpx.AsyncClient(timeout=120) as client:
                payload = {**body(hybrid_mode="ar"), "stream": True}
                async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as resp:
                    return parse_sse((await resp.aread()).decode())

        events = asyncio.run(go())
        assert events[-1] == "[DONE]" and content_of(events).strip()
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        proc.wait(timeout=90)
        assert lv.running_pid() is None  # the vLLM server stopped with it
    finally:
        terminate(proc)
        if lv.running_pid() is not None:
            lv.stop()
