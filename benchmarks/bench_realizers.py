"""Realizer benchmark: load time, TTFT and decode tokens/s of the embedded backends (and a vLLM server, if given).

    python -m benchmarks.bench_realizers                         # llama_cpp + transformers, max_tokens 128
    python -m benchmarks.bench_realizers --vllm-url http://127.0.0.1:8011/v1   # also a running server
    python -m benchmarks.bench_realizers --backends llama_cpp@off,llama_cpp@on --repeat 3   # extra buffer types
    python -m benchmarks.bench_realizers --backends llama_cpp --concurrency 1,8,32          # continuous batching
    python -m benchmarks.bench_realizers --backends llama_cpp --weights q4_1,q8_0,q4_0 --paired   # weight types
    python -m benchmarks.bench_realizers --quality --weights q4_1,q8_0,q4_0                 # what conversion costs
    python -m benchmarks.bench_realizers --backends llama_cpp --weights q4_1,q8_0,q4_0 --steps 1,8,32 --repeat 3

A backend is `llama_cpp` or `transformers`, optionally with `:THREADS`; `llama_cpp@on` / `@off` forces llama.cpp's
CPU extra buffer types (AMX / weight repacking; without a suffix: the machine's verdict, realizers/llamacpp.py);
`llama_cpp+q4_0` runs the packaged SmolLM2 at that weight type (`realizer.weights`; converted once into the cache),
and `--weights a,b` expands every llama_cpp backend into one per type.
Every backend gets one untimed warm-up request, then the same prompts, greedy, one at a time. TTFT is measured
from the request to the first non-empty text (as `vllm bench serve`); tokens/s = completion tokens / (total - TTFT).
`--repeat N` runs the whole list N times, interleaved, so a neighbour's load falls on every backend alike; each
backend's figure is then the median over rounds, and `ratio` divides it by the first backend's (the baseline,
measured in the same run). `--paired` loads every backend at once and sends each prompt to each backend in turn:
`ratio` is then the median of per-prompt ratios, the steadiest comparison on a shared machine. `--concurrency`
also sends N requests at once per backend and reports the aggregate completion tokens/s over the burst's wall
time and its ratio to one stream (N=1) of the same run.
`--steps 1,8,32` times llama.cpp alone (one `llama_decode` of a 128-token prompt, and of N single-token sequences)
per backend, all loaded at once and measured in turn (`--repeat` rounds): what a weight type's kernels allow before
any sampling, Python or HTTP. Bursts (`--concurrency`) report `decode_share`, the part of their wall time inside
`llama_decode`.
`--quality` compares weight types instead of timing them, the first type (the shipped q4_1) as the reference:
accuracy on the factual task set (hybrid/tasks.py; the product's AR prompt and sampling: greedy, repetition
penalty 1.1, all questions in one batch) and, teacher-forced on the reference's own answers, the mean KL divergence
KL(reference || type) of the next-token distributions, the share of positions whose top token agrees, and the mean
NLL of the reference's tokens (llama.cpp's `llama-perplexity --kl-divergence` measures the same things).
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
    name, _, weights = name.partition("+")
    n = int(threads) if threads else None
    if name == "llama_cpp":
        return LlamaCppRealizer(
            n_threads=n, extra_bufts=bufts or None, max_seqs=max_seqs, weights=weights or "auto", progress=print
        )
    if name == "transformers":
        return TransformersRealizer(num_threads=n)
    raise SystemExit(f"unknown backend {backend!r}")


async def _one(realizer, prompt: str, max_tokens: int) -> Completion:
    return await acomplete(realizer, [{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens))


async def _burst(realizer, n: int, max_tokens: int) -> dict:
    """n requests at once (distinct prompts, greedy): aggregate completion tokens/s over the burst's wall time, and
    (llama_cpp) the share of it spent inside `llama_decode`."""
    engine = getattr(realizer, "engine", None)
    d0 = getattr(engine, "decode_s", 0.0)
    t0 = time.perf_counter()
    cs = await asyncio.gather(*(_one(realizer, f"{PROMPTS[i % len(PROMPTS)]} (#{i})", max_tokens) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(c.usage.completion_tokens for c in cs)
    ttfts = sorted(c.timings.ttft_s or 0.0 for c in cs)
    out = dict(
        clients=n,
        wall_s=round(wall, 2),
        completion_tokens=tokens,
        aggregate_tokens_per_s=round(tokens / wall, 1),
        ttft_s_p50=round(ttfts[len(ttfts) // 2], 3),
        ttft_s_max=round(ttfts[-1], 3),
    )
    if engine is not None:
        out["decode_share"] = round((engine.decode_s - d0) / wall, 3)
    return out


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
    ttft: dict[str, list[float]] = {b: [] for b in backends}
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    for k in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            order = backends[(k + i) % len(backends) :] + backends[: (k + i) % len(backends)]
            timings = {b: (await _one(made[b], prompt, max_tokens)).timings for b in order}
            got = {b: t.tokens_per_s or 0.0 for b, t in timings.items()}
            for b in backends:
                tps[b].append(got[b])
                ttft[b].append(timings[b].ttft_s or 0.0)
                ratios[b].append(got[b] / max(got[backends[0]], 1e-9))
    out = []
    for b, r in made.items():
        out.append(
            dict(
                backend=b,
                extra_bufts=getattr(getattr(r, "engine", None), "extra_bufts", None),
                tokens_per_s=round(statistics.median(tps[b]), 1),
                ttft_s_median=round(statistics.median(ttft[b]), 3),
                ratio=round(statistics.median(ratios[b]), 3),
                ratio_min_max=[round(min(ratios[b]), 3), round(max(ratios[b]), 3)],
                pairs=len(ratios[b]),
            )
        )
        await r.aclose()
    return out


def steps(backends: list[str], rounds: int, sizes: list[int]) -> list[dict]:
    """llama.cpp's own cost, no sampling or Python loop: one `llama_decode` of a 128-token prompt (tokens/s) and of
    N single-token sequences (ms per step, tokens/s), per backend (`llama_cpp+WEIGHTS:THREADS`), all loaded at
    once and measured in turn, the order alternating per round; medians over rounds of the median of 4 repeats."""
    import llama_cpp as ll

    made = {}
    for b in backends:
        r = _make(b, None, max(sizes))
        made[b] = r
    res: dict[str, dict[str, list[float]]] = {b: {} for b in backends}

    def decode(e, toks: list[tuple[int, int, int, bool]]) -> float:
        batch = e._batch
        for i, (t, pos, sid, logits) in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, logits
            batch.seq_id[i][0] = sid
        batch.n_tokens = len(toks)
        t0 = time.perf_counter()
        if ll.llama_decode(e.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t0

    for k in range(rounds):
        for b in backends if k % 2 == 0 else backends[::-1]:
            e = made[b].engine
            ll.llama_memory_clear(e.mem, True)
            res[b].setdefault("prompt128_tokens_per_s", []).append(
                128 / decode(e, [(100 + i, i, 0, i == 127) for i in range(128)])
            )
            ll.llama_memory_clear(e.mem, True)
            for s0 in range(0, max(sizes), 4):  # 40-token prompts in every sequence (untimed)
                decode(e, [(200 + i + s, i, s, i == 39) for s in range(s0, min(s0 + 4, max(sizes))) for i in range(40)])
            for n in sizes:
                ts = []
                for j in range(4):
                    ts.append(decode(e, [(300 + s + j, 40, s, True) for s in range(n)]))
                    for s in range(n):
                        ll.llama_memory_seq_rm(e.mem, s, 40, -1)
                res[b].setdefault(f"step{n}_ms", []).append(statistics.median(ts) * 1000)
    out = []
    for b in backends:
        row = dict(backend=b, extra_bufts=made[b].engine.extra_bufts, weights=getattr(made[b], "weights", None))
        row.update({k: round(statistics.median(v), 1) for k, v in res[b].items()})
        row.update({f"step{n}_tokens_per_s": round(n / row[f"step{n}_ms"] * 1000, 1) for n in sizes})
        out.append(row)
        made[b].close()
    return out


async def quality(weights: list[str], n_tasks: int, max_tokens: int) -> list[dict]:
    """Accuracy on the factual tasks per weight type, and KL / top-1 agreement / NLL against the first type's
    distributions on the first type's own answers (teacher-forced). See the module docstring."""
    import numpy as np

    from hybrid import prompts
    from hybrid.compare import check_answer
    from hybrid.tasks import factual_tasks, subsample
    from realizers.embedded import LlamaCppRealizer
    from realizers.llamacpp import load_llama

    tasks = subsample(factual_tasks(), n_tasks)
    msgs = [prompts.realizer_messages(t.question, None) for t in tasks]
    params = SamplingParams(max_tokens=max_tokens, extra={"repetition_penalty": 1.1})  # the product's defaults
    seqs: list[tuple[int, list[int]]] = []  # (prompt length, prompt + reference answer ids)
    ref: list[np.ndarray] = []  # reference log-probs at the answer positions, one (n, V) array per task
    out = []
    for w in weights:
        r = LlamaCppRealizer(weights=w, max_seqs=min(32, len(tasks)), n_ctx=512, progress=print)
        t0 = time.perf_counter()
        cs = await asyncio.gather(*(acomplete(r, m, params) for m in msgs))
        seconds = time.perf_counter() - t0
        right = [bool(check_answer(t, c.text)) for t, c in zip(tasks, cs, strict=True)]
        if not seqs:
            for m, c in zip(msgs, cs, strict=True):
                p = r.prompt_ids(m)
                answer = r.engine.model.tokenize(c.text.encode("utf-8"), add_bos=False, special=False)
                seqs.append((len(p), p + answer[:max_tokens]))
        path, name = r.path, r.name
        r.close()
        threads = max(1, (os.cpu_count() or 2) // 2)  # both: llama-cpp-python's prompt default is every core
        llm = load_llama(path, n_ctx=512, n_batch=512, logits_all=True, n_threads=threads, n_threads_batch=threads)
        kl, agree, nll, n = 0.0, 0, 0.0, 0
        for k, (plen, seq) in enumerate(seqs):
            llm.reset()
            llm.eval(seq)
            logits = np.asarray(llm.scores[plen - 1 : len(seq) - 1], dtype=np.float64)  # predicts seq[plen:]
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            if len(ref) <= k:
                ref.append(logp.astype(np.float32))
            rp = ref[k].astype(np.float64)
            kl += float((np.exp(rp) * (rp - logp)).sum())
            agree += int((rp.argmax(-1) == logp.argmax(-1)).sum())
            nll -= float(logp[np.arange(len(logp)), seq[plen:]].sum())
            n += len(logp)
        del llm
        row = dict(
            weights=w,
            realizer=name,
            accuracy=round(sum(right) / len(right), 3),
            right=sum(right),
            tasks=len(right),
            answers_seconds=round(seconds, 1),
            kl_vs_first=round(kl / max(n, 1), 5),
            top1_agreement=round(agree / max(n, 1), 4),
            nll_of_first_answers=round(nll / max(n, 1), 4),
            positions=n,
            changed_answers=None,
        )
        row["texts"] = [c.text for c in cs]
        out.append(row)
        print(
            f"{w:6s} accuracy {row['accuracy']:.1%} ({row['right']}/{row['tasks']})  KL vs {weights[0]} "
            f"{row['kl_vs_first']:.4f}  top-1 agreement {row['top1_agreement']:.1%}  "
            f"NLL {row['nll_of_first_answers']:.3f}  ({n} positions)",
            flush=True,
        )
    first = out[0]["texts"] if out else []
    for row in out:
        row["changed_answers"] = sum(a != b for a, b in zip(row.pop("texts"), first, strict=True))
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
    p.add_argument("--weights", default="", help="comma list of realizer.weights types; expands llama_cpp backends")
    p.add_argument("--quality", action="store_true", help="compare --weights on the factual tasks (no timing)")
    p.add_argument("--tasks", type=int, default=80, help="--quality: factual tasks (spread over the topics)")
    p.add_argument(
        "--steps", default="", help="time llama_decode itself: comma list of sequences per step, e.g. 1,8,32"
    )
    a = p.parse_args()
    weights = [w for w in a.weights.split(",") if w]
    if a.quality:
        load_before = os.getloadavg()
        results = asyncio.run(quality(weights or ["q4_1", "q8_0", "q4_0"], a.tasks, min(a.max_tokens, 64)))
        env = dict(cpus=os.cpu_count(), cpu=cpu_model(), llama_cpp_features=cpu_flags_summary())
        env["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(dict(bench="realizers", mode="quality", env=env, results=results)))
        return
    backends = [b for b in a.backends.split(",") if b] + (["vllm"] if a.vllm_url else [])
    if weights:
        backends = [f"{b.replace('llama_cpp', 'llama_cpp+' + w, 1)}" for b in backends for w in weights]
        backends = list(dict.fromkeys(backends))
    if a.steps:
        load_before = os.getloadavg()
        sizes = [int(n) for n in a.steps.split(",") if n]
        results = steps([b for b in backends if b.startswith("llama_cpp")], max(a.repeat, 1), sizes)
        for r in results:
            per = "  ".join(f"x{n}: {r[f'step{n}_ms']} ms = {r[f'step{n}_tokens_per_s']} tok/s" for n in sizes)
            print(f"{r['backend']:20s} prompt {r['prompt128_tokens_per_s']} tok/s  {per}", flush=True)
        env = dict(cpus=os.cpu_count(), cpu=cpu_model(), llama_cpp_features=cpu_flags_summary())
        env["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(dict(bench="realizers", mode="steps", env=env, results=results)))
        return
    if a.paired:
        load_before = os.getloadavg()
        results = asyncio.run(paired(backends, a.max_tokens, a.repeat, a.vllm_url, a.max_seqs))
        for r in results:
            print(
                f"{r['backend']:16s} median {r['tokens_per_s']:6.1f} tok/s  TTFT {r['ttft_s_median'] * 1000:5.0f} ms  "
                f"ratio vs {backends[0]}: {r['ratio']}"
            )
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
            burst = "  ".join(
                f"x{x['clients']}: {x['aggregate_tokens_per_s']} tok/s (TTFT max {x['ttft_s_max']} s"
                + (f", {x['decode_share']:.0%} in llama_decode)" if "decode_share" in x else ")")
                for x in r["bursts"]
            )
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
