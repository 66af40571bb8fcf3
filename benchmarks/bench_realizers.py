"""Realizer benchmark: load time, TTFT and decode tokens/s of the embedded backends (and a vLLM server, if given).

    python -m benchmarks.bench_realizers                         # llama_cpp + transformers, max_tokens 128
    python -m benchmarks.bench_realizers --vllm-url http://127.0.0.1:8011/v1   # also a running server
    python -m benchmarks.bench_realizers --backends llama_cpp@off,llama_cpp@on --repeat 3   # extra buffer types
    python -m benchmarks.bench_realizers --backends llama_cpp --concurrency 1,8,32          # continuous batching

A backend is `llama_cpp` or `transformers`, optionally with `:THREADS`; `llama_cpp@on` / `@off` forces llama.cpp's
CPU extra buffer types (AMX / weight repacking; without a suffix: the machine's verdict, realizers/llamacpp.py).
Every backend gets one untimed warm-up request, then the same prompts, greedy, one at a time. TTFT is measured
from the request to the first non-empty text (as `vllm bench serve`); tokens/s = completion tokens / (total - TTFT).
`--repeat N` runs the whole list N times, interleaved, so a neighbour's load falls on every backend alike; each
backend's figure is then the median over rounds, and `ratio` divides it by the first backend's (the baseline,
measured in the same run). `--paired` loads every backend at once and sends each prompt to each backend in turn:
`ratio` is then the median of per-prompt ratios, the steadiest comparison on a shared machine. `--concurrency`
also sends N requests at once per backend and reports the aggregate completion tokens/s over the burst's wall
time and its ratio to one stream (N=1) of the same run.
Prints one line per backend and the whole result as JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

from realizers.base import Completion, SamplingParams, acomplete
from realizers.llamacpp import cpu_flags_summary, cpu_model

PROMPTS = [
    "Explain how a bicycle works, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the seasons on Earth? Explain in detail.",
    "Give me ten tips for learning a new language, with a sentence on each.",
]


def _make(backend: str, vllm_url: str | None, max_seqs: int = 32):
    """`llama_cpp`, `transformers`, either with `:N` threads (default: the backend's own), or `vllm`."""
    if backend == "vllm":
        from realizers.openai_compat import OpenAIRealizer

        return OpenAIRealizer(vllm_url, None, timeout_s=120)
    from realizers.embedded import LlamaCppRealizer, TransformersRealizer

    spec, _, bufts = backend.partition("@")
    name, _, threads = spec.partition(":")
    n = int(threads) if threads else None
    if name == "llama_cpp":
        return LlamaCppRealizer(n_threads=n, extra_bufts=bufts or None, max_seqs=max_seqs)
    if name == "transformers":
        return TransformersRealizer(num_threads=n)
    raise SystemExit(f"unknown backend {backend!r}")


async def _one(realizer, prompt: str, max_tokens: int) -> Completion:
    return await acomplete(realizer, [{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens))


async def _burst(realizer, n: int, max_tokens: int) -> dict:
    """n requests at once (distinct prompts, greedy): aggregate completion tokens/s over the burst's wall time."""
    t0 = time.perf_counter()
    cs = await asyncio.gather(*(_one(realizer, f"{PROMPTS[i % len(PROMPTS)]} (#{i})", max_tokens) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(c.usage.completion_tokens for c in cs)
    ttfts = sorted(c.timings.ttft_s or 0.0 for c in cs)
    return dict(
        clients=n,
        wall_s=round(wall, 2),
        completion_tokens=tokens,
        aggregate_tokens_per_s=round(tokens / wall, 1),
        ttft_s_p50=round(ttfts[len(ttfts) // 2], 3),
        ttft_s_max=round(ttfts[-1], 3),
    )


async def bench(backend: str, max_tokens: int, vllm_url: str | None, concurrency: list[int], max_seqs: int) -> dict:
    t0 = time.perf_counter()
    realizer = _make(backend, vllm_url, max_seqs)
    load_s = time.perf_counter() - t0
    warm = await _one(realizer, "Say hello.", 16)
    runs = []
    for prompt in PROMPTS:
        c = await _one(realizer, prompt, max_tokens)
        runs.append(
            dict(
                prompt_tokens=c.usage.prompt_tokens,
                completion_tokens=c.usage.completion_tokens,
                ttft_s=round(c.timings.ttft_s or 0.0, 4),
                total_s=round(c.timings.total_s, 3),
                tokens_per_s=round(c.timings.tokens_per_s or 0.0, 1),
            )
        )
    bursts = [await _burst(realizer, n, max_tokens) for n in concurrency]
    one = max(bursts[0]["aggregate_tokens_per_s"], 1e-9) if bursts else 1.0
    for b in bursts:
        b["ratio_vs_one_stream"] = round(b["aggregate_tokens_per_s"] / one, 2)
    engine = getattr(realizer, "engine", None)
    await realizer.aclose()
    return dict(
        backend=backend,
        extra_bufts=getattr(engine, "extra_bufts", None),
        bursts=bursts,
        load_s=round(load_s, 2),
        warmup_ttft_s=round(warm.timings.ttft_s or 0.0, 3),
        ttft_s_median=round(statistics.median(r["ttft_s"] for r in runs), 4),
        tokens_per_s_median=round(statistics.median(r["tokens_per_s"] for r in runs), 1),
        completion_tokens=sum(r["completion_tokens"] for r in runs),
        runs=runs,
    )


async def paired(backends: list[str], max_tokens: int, rounds: int, vllm_url: str | None, max_seqs: int) -> list[dict]:
    """All backends loaded at once, then every prompt of every round on each backend in turn (the order rotating):
    a neighbour's load changes slowly, so each prompt's ratio to the first backend compares like with like."""
    made = {b: _make(b, vllm_url, max_seqs) for b in backends}
    for r in made.values():
        await _one(r, "Say hello.", 16)
    tps: dict[str, list[float]] = {b: [] for b in backends}
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    for k in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            order = backends[(k + i) % len(backends) :] + backends[: (k + i) % len(backends)]
            got = {b: (await _one(made[b], prompt, max_tokens)).timings.tokens_per_s or 0.0 for b in order}
            for b in backends:
                tps[b].append(got[b])
                ratios[b].append(got[b] / max(got[backends[0]], 1e-9))
    out = []
    for b, r in made.items():
        out.append(
            dict(
                backend=b,
                extra_bufts=getattr(getattr(r, "engine", None), "extra_bufts", None),
                tokens_per_s=round(statistics.median(tps[b]), 1),
                ratio=round(statistics.median(ratios[b]), 3),
                ratio_min_max=[round(min(ratios[b]), 3), round(max(ratios[b]), 3)],
                pairs=len(ratios[b]),
            )
        )
        await r.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backends",
        default="llama_cpp,transformers:1,transformers:2",
        help="comma-separated: llama_cpp, transformers, each optionally with :THREADS",
    )
    p.add_argument("--vllm-url", default=None, help="also measure the OpenAI-compatible server at this URL")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="rounds over the backend list (interleaved)")
    p.add_argument("--concurrency", default="", help="comma list of burst sizes, e.g. 1,8,32 (1 = the baseline)")
    p.add_argument("--paired", action="store_true", help="load every backend at once and alternate per prompt")
    p.add_argument("--max-seqs", type=int, default=32, help="llama_cpp: sequences decoded together")
    a = p.parse_args()
    backends = [b for b in a.backends.split(",") if b] + (["vllm"] if a.vllm_url else [])
    if a.paired:
        load_before = os.getloadavg()
        results = asyncio.run(paired(backends, a.max_tokens, a.repeat, a.vllm_url, a.max_seqs))
        for r in results:
            print(f"{r['backend']:16s} median {r['tokens_per_s']:6.1f} tok/s  ratio vs {backends[0]}: {r['ratio']}")
        env = dict(cpus=os.cpu_count(), cpu=cpu_model(), llama_cpp_features=cpu_flags_summary())
        env["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(dict(bench="realizers", mode="paired", max_tokens=a.max_tokens, env=env, results=results)))
        return
    concurrency = [int(n) for n in a.concurrency.split(",") if n]
    if concurrency and concurrency[0] != 1:
        concurrency = [1, *concurrency]
    rounds: dict[str, list[dict]] = {b: [] for b in backends}
    load_before = os.getloadavg()
    for k in range(a.repeat):
        for b in backends:
            r = asyncio.run(bench(b, a.max_tokens, a.vllm_url, concurrency, a.max_seqs))
            rounds[b].append(r)
            burst = "  ".join(f"x{x['clients']}: {x['aggregate_tokens_per_s']} tok/s" for x in r["bursts"])
            print(
                f"[{k + 1}/{a.repeat}] {b:16s} load {r['load_s']:6.2f} s  TTFT median {r['ttft_s_median'] * 1000:6.0f} "
                f"ms  {r['tokens_per_s_median']:6.1f} tok/s  ({r['completion_tokens']} tokens over {len(PROMPTS)} "
                f"prompts)  {burst}",
                flush=True,
            )
    results = []
    for b in backends:
        tps = statistics.median(r["tokens_per_s_median"] for r in rounds[b])
        results.append(dict(backend=b, tokens_per_s=round(tps, 1), rounds=rounds[b]))
    for r in results:
        r["ratio"] = round(r["tokens_per_s"] / max(results[0]["tokens_per_s"], 1e-9), 3)
        print(f"{r['backend']:16s} median {r['tokens_per_s']:6.1f} tok/s  ratio vs {backends[0]}: {r['ratio']}")
    env = dict(
        machine=platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        loadavg_1m_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # neighbours share the CPU
    )
    env.update(cpu=cpu_model(), llama_cpp_features=cpu_flags_summary())
    print(json.dumps(dict(bench="realizers", max_tokens=a.max_tokens, repeat=a.repeat, env=env, results=results)))


if __name__ == "__main__":
    main()
