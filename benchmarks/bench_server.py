"""Server benchmark: N concurrent streaming clients against `hybrid serve`, per mode.

    python -m benchmarks.bench_server --url http://127.0.0.1:8000/v1            # a running server
    python -m benchmarks.bench_server --start "--gen-length 16 --steps 16"       # start one (args to serve)
    python -m benchmarks.bench_server -n 32 --max-tokens 32 --modes hybrid,ar
    python -m benchmarks.bench_server --start "" -n 1,8,32 --modes ar,hybrid    # single stream, 8 and 32 clients
    python -m benchmarks.bench_server --start "--mode ar --load-modes ar" -n 1,8,32 --modes ar --weights q4_1,q8_0
    python -m benchmarks.bench_server --start "--mode ar --load-modes ar" -n 1,8,32 --modes ar --prefix-cache on,off

Every mode gets one untimed warm-up request, then N clients start together, each streaming one chat
completion (distinct held-out questions, none repeated in a run, greedy); `-n` may list several N, run in
order per mode. With N = 1 in the list, every burst of that mode also reports its aggregate content tokens/s
as a ratio to that single stream
(`ratio_vs_single`), measured in the same run. Per request, from the moment it is sent: plan latency (the chunk
carrying the plan arrived; the server's own plan_ms beside it), TTFT (first chunk with non-empty content, as
`vllm bench serve`), total time; then p50 / p99 over the requests, throughput (requests/s and content
tokens/s over the wall time of the whole burst) and errors. `ar` (the realizer alone) is the baseline measured
in the same run. With N < 100, p99 is the slowest request. `--weights a,b` (with --start) starts one server per
embedded realizer weight type (`--set realizer.weights=a`), all at once, and runs every burst on each in turn (the
order rotating), so the types are compared under the same neighbours' load; `--prefix-cache on,off` likewise
compares `realizer.prefix_cache` (one server per weight type and setting). Each burst records the 1-minute load
average before and after it. Prints a table; JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

import httpx


def questions() -> list[str]:
    """Distinct open questions (the held-out free-text prompts of `planners.adapt.data.make_prompts`): every request
    of a run gets its own, so a prefix cache shares only what real clients share (the chat template and system
    turn), never a whole question."""
    from planners.adapt.data import make_prompts

    return [p.text for p in make_prompts(0)["heldout"] if p.kind != "arithmetic"]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = min(len(v), max(1, math.ceil(q / 100 * len(v)))) - 1
    return round(v[k], 1)


async def one(client: httpx.AsyncClient, url: str, headers: dict, payload: dict) -> dict:
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000  # noqa: E731
    out: dict = {"plan_ms": None, "server_plan_ms": None, "ttft_ms": None, "tokens": 0, "error": None}
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=payload, headers=headers) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    out["error"] = ev["error"].get("message")
                    continue
                info = ev.get("hybrid") or {}
                if info.get("event") == "plan" and out["plan_ms"] is None:
                    out["plan_ms"], out["server_plan_ms"] = ms(), info.get("plan_ms")
                if ev.get("usage"):
                    out["tokens"] = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or ():
                    if (ch.get("delta") or {}).get("content") and out["ttft_ms"] is None:
                        out["ttft_ms"] = ms()
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["total_ms"] = ms()
    return out


async def burst(
    url: str, api_key: str | None, mode: str, n: int, max_tokens: int, timeout_s: float, prompts: list[str]
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        def payload(q: str) -> dict:
            return {
                "messages": [{"role": "user", "content": q}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "hybrid_mode": mode,
            }

        warm = await one(client, url, headers, payload("Say hello."))
        if warm["error"]:
            raise SystemExit(f"bench_server: warm-up request ({mode}) failed: {warm['error']}")
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(client, url, headers, payload(prompts[i % len(prompts)])) for i in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in runs if not r["error"]]
    errors = [r["error"] for r in runs if r["error"]]
    tokens = sum(r["tokens"] for r in ok)
    col = lambda k: [r[k] for r in ok if r[k] is not None]  # noqa: E731
    return {
        "mode": mode,
        "clients": n,
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "content_tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "ttft_ms": {"p50": pct(col("ttft_ms"), 50), "p99": pct(col("ttft_ms"), 99)},
        "total_ms": {"p50": pct(col("total_ms"), 50), "p99": pct(col("total_ms"), 99)},
        "plan_ms": {"p50": pct(col("plan_ms"), 50), "p99": pct(col("plan_ms"), 99)},
        "server_plan_ms": {"p50": pct(col("server_plan_ms"), 50), "p99": pct(col("server_plan_ms"), 99)},
        "warmup_ttft_ms": round(warm["ttft_ms"] or 0.0, 1),
    }


def start_server(serve_args: str, log: Path) -> tuple[object, str]:
    from realizers.server import launch, wait_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hybrid.server", "--port", str(port), "--load-modes", "all", "--log-level", "warning"]
    cmd += shlex.split(serve_args)
    url = f"http://127.0.0.1:{port}/v1"
    print(f"starting: {' '.join(cmd)} (log {log})", file=sys.stderr)
    proc = launch(cmd, log_path=log)
    wait_ready(url, timeout_s=600, proc=proc, log_path=log)
    return proc, url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="server base URL (ignored with --start)")
    p.add_argument("--start", metavar="SERVE_ARGS", help="start `hybrid serve` with these arguments, then stop it")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"))
    p.add_argument("-n", "--clients", default="32", help="concurrent clients; a comma list runs each in turn")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--modes", default="hybrid,ar", help="comma list; ar is the baseline")
    p.add_argument("--weights", default="", help="with --start: one server per realizer.weights type (comma list)")
    p.add_argument(
        "--prefix-cache", default="", help="with --start: one server per realizer.prefix_cache setting (on,off)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a client waits")
    p.add_argument("--log", type=Path, default=Path("bench_server.log"), help="server log with --start")
    a = p.parse_args(argv)
    weights = [w.strip() for w in a.weights.split(",") if w.strip()]
    caching = [c.strip() for c in a.prefix_cache.split(",") if c.strip()]
    if (weights or caching) and a.start is None:
        raise SystemExit("bench_server: --weights and --prefix-cache need --start (one server per setting)")
    if any(c not in ("on", "off") for c in caching):
        raise SystemExit(f"bench_server: --prefix-cache takes on and/or off, got {a.prefix_cache!r}")
    procs: list[object] = []
    targets: list[tuple[str, str]] = []  # (label: weights and prefix-cache setting, base URL)
    settings: dict[str, tuple[str, str]] = {"": ("", "")}  # label -> (weights, prefix-cache setting)
    if a.start is not None:
        for w in weights or [""]:
            for c in caching or [""]:
                serve = a.start + (f" --set realizer.weights={w}" if w else "")
                serve += f" --set realizer.prefix_cache={'true' if c == 'on' else 'false'}" if c else ""
                label = "/".join(x for x in (w, f"prefix_cache={c}" if c else "") if x)
                log = a.log.with_name(f"{a.log.stem}.{label.replace('/', '.')}{a.log.suffix}") if label else a.log
                proc, url = start_server(serve, log)
                procs.append(proc)
                targets.append((label, url))
                settings[label] = (w, c)
    else:
        targets.append(("", a.url.rstrip("/")))
    clients = [int(n) for n in str(a.clients).split(",") if n.strip()]
    load_start = os.getloadavg()[0]
    try:
        results = []
        runs = [(m.strip(), n) for m in a.modes.split(",") if m.strip() for n in clients]
        pool = questions()
        for k, (mode, n) in enumerate(runs):
            first = sum(m for _, m in runs[:k])  # each burst its own questions; every server the same ones
            prompts = [pool[(first + i) % len(pool)] for i in range(n)]
            for w, url in targets[k % len(targets) :] + targets[: k % len(targets)]:
                before = os.getloadavg()[0]
                r = asyncio.run(burst(url, a.api_key, mode, n, a.max_tokens, a.timeout, prompts))
                r["server"] = w or None
                r["weights"], r["prefix_cache"] = (x or None for x in settings[w])
                r["loadavg_1m_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                single = next(
                    (x for x in results if (x["mode"], x["clients"], x["server"]) == (mode, 1, r["server"])), None
                )
                if single and single["content_tokens_per_s"]:
                    r["ratio_vs_single"] = round(r["content_tokens_per_s"] / single["content_tokens_per_s"], 2)
                results.append(r)
                print(
                    (f"[{w}] " if w else "")
                    + f"{mode:9s} {r['completed']:3d}/{r['clients']} ok, {r['errors']} errors | "
                    f"plan p50 {r['plan_ms']['p50']} p99 {r['plan_ms']['p99']} ms | "
                    f"TTFT p50 {r['ttft_ms']['p50']} p99 {r['ttft_ms']['p99']} ms | "
                    f"total p50 {r['total_ms']['p50']} p99 {r['total_ms']['p99']} ms | "
                    f"{r['requests_per_s']} req/s, {r['content_tokens_per_s']} tok/s (wall {r['wall_s']} s)"
                    + (f" | x{r['ratio_vs_single']} single" if "ratio_vs_single" in r else "")
                    + f" | load {r['loadavg_1m_before_after'][0]}-{r['loadavg_1m_before_after'][1]}",
                    flush=True,
                )
        metrics = {
            w or "server": httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).json() for w, url in targets
        }
    finally:
        from realizers.server import terminate

        for proc in procs:
            terminate(proc)
    print(
        json.dumps(
            {
                "bench": "server",
                "url": targets[0][1] if len(targets) == 1 else [url for _, url in targets],
                "serve_args": a.start,
                "weights": weights or None,
                "prefix_cache": caching or None,
                "clients": clients,
                "max_tokens": a.max_tokens,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "results": results,
                "server_metrics": metrics if len(targets) > 1 else next(iter(metrics.values())),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
