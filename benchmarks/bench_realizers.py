"""Realizer benchmark: load time, TTFT and decode tokens/s of the embedded backends (and a vLLM server, if given).

    python -m benchmarks.bench_realizers                         # llama_cpp + transformers, max_tokens 128
    python -m benchmarks.bench_realizers --vllm-url http://127.0.0.1:8011/v1   # also a running server

Every backend gets one untimed warm-up request, then the same prompts, greedy, one at a time. TTFT is measured
from the request to the first non-empty text (as `vllm bench serve`); tokens/s = completion tokens / (total - TTFT).
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

PROMPTS = [
    "Explain how a bicycle works, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the seasons on Earth? Explain in detail.",
    "Give me ten tips for learning a new language, with a sentence on each.",
]


def _make(backend: str, vllm_url: str | None):
    """`llama_cpp`, `transformers`, either with `:N` threads (default: the backend's own), or `vllm`."""
    if backend == "vllm":
        from realizers.openai_compat import OpenAIRealizer

        return OpenAIRealizer(vllm_url, None, timeout_s=120)
    from realizers.embedded import LlamaCppRealizer, TransformersRealizer

    name, _, threads = backend.partition(":")
    n = int(threads) if threads else None
    if name == "llama_cpp":
        return LlamaCppRealizer(n_threads=n)
    if name == "transformers":
        return TransformersRealizer(num_threads=n)
    raise SystemExit(f"unknown backend {backend!r}")


async def _one(realizer, prompt: str, max_tokens: int) -> Completion:
    return await acomplete(realizer, [{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens))


async def bench(backend: str, max_tokens: int, vllm_url: str | None) -> dict:
    t0 = time.perf_counter()
    realizer = _make(backend, vllm_url)
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
    await realizer.aclose()
    return dict(
        backend=backend,
        load_s=round(load_s, 2),
        warmup_ttft_s=round(warm.timings.ttft_s or 0.0, 3),
        ttft_s_median=round(statistics.median(r["ttft_s"] for r in runs), 4),
        tokens_per_s_median=round(statistics.median(r["tokens_per_s"] for r in runs), 1),
        completion_tokens=sum(r["completion_tokens"] for r in runs),
        runs=runs,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backends",
        default="llama_cpp,transformers:1,transformers:2",
        help="comma-separated: llama_cpp, transformers, each optionally with :THREADS",
    )
    p.add_argument("--vllm-url", default=None, help="also measure the OpenAI-compatible server at this URL")
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args()
    backends = [b for b in a.backends.split(",") if b] + (["vllm"] if a.vllm_url else [])
    results = []
    load_before = os.getloadavg()
    for b in backends:
        r = asyncio.run(bench(b, a.max_tokens, a.vllm_url))
        print(
            f"{b:13s} load {r['load_s']:6.2f} s  TTFT median {r['ttft_s_median'] * 1000:6.0f} ms  "
            f"{r['tokens_per_s_median']:6.1f} tok/s  ({r['completion_tokens']} tokens over {len(PROMPTS)} prompts)",
            flush=True,
        )
        results.append(r)
    env = dict(
        machine=platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        loadavg_1m_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # neighbours share the CPU
    )
    print(json.dumps(dict(bench="realizers", max_tokens=a.max_tokens, env=env, results=results)))


if __name__ == "__main__":
    main()
