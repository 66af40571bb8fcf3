"""Plan vs realizer: does the embedded planner draft a plan faster than the embedded realizer writes one?

For each held-out prompt (`planners.adapt.data.make_prompts`, topics never seen in training) and in the same
process, alternating the order per prompt:
  - each planner engine drafts a `--gen-length` plan with the product's sampler settings (its default commit
    rule, blocks of 8, prefix KV cache, trajectory recorded; `--set planner.commit=...` and friends change them,
    `--adapter` another planner adapter), batch 1, through `Planner.plan`: wall time, NFE, tokens per pass
    (span tokens / NFE), ms per pass;
  - the realizer (llama.cpp, the packaged Q4_1 GGUF, through `realizers.llamacpp.load_llama`) writes the same
    number of tokens greedily (prompt evaluation included, EOS ignored): wall time. Its greedy text up to EOS is
    the AR reference plan;
  - ratio = plan time / realizer time (< 1: the planner drafts faster than the realizer writes).
Quality per engine, as `bench_planner_quality.py` defines it: the untouched AR model's NLL per plan token
(adapter off, causal attention), MiniLM cosine to the AR plan, repeated bigrams.
Then a per-forward micro-benchmark: one pass of 1 / 8 / 16 / 48 positions (a block of that many, bidirectional)
over a KV cache of `--context` positions, per engine, median of `--repeat`, engines alternating.

Engines: torch_fp32 (LoRA merged), torch_bf16, llama_<type> for GGUF exports of the planner
(`planners.export_gguf`: f32, f16, q8_0, q4_0, q4_1, q4_k_m, ...).

    python -m benchmarks.bench_plan_vs_ar
    python -m benchmarks.bench_plan_vs_ar --prompts 4 --engines torch_fp32 llama_q8_0 --no-micro
    python -m benchmarks.bench_plan_vs_ar --engines llama_q8_0 --no-micro --adapter runs/cf/adapter.safetensors \
        --set planner.commit=threshold --set planner.threshold=0.9

Prints tables; the whole result is JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DEFAULT_ENGINES = ["torch_fp32", "llama_f32", "llama_f16", "llama_q8_0", "llama_q4_0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=20, help="held-out free-text prompts")
    p.add_argument("--gen-length", type=int, default=48)
    p.add_argument("--engines", nargs="*", default=DEFAULT_ENGINES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--positions", type=int, nargs="*", default=[1, 8, 16, 48])
    p.add_argument("--context", type=int, default=112, help="micro-benchmark: cached positions (prompt + plan)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default=None, help="planner adapter .safetensors (default: the shipped one)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override as `hybrid run --set` reads it, e.g. planner.commit=threshold (repeatable)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models


def load_planner(engine: str, sampler, threads: int, adapter: str | None = None):
    from planners.planner import Planner

    if engine.startswith("torch_"):
        dtype = {"torch_fp32": torch.float32, "torch_bf16": torch.bfloat16}[engine]
        return Planner.load(adapter=adapter, engine="torch", dtype=dtype, sampler=sampler, device="cpu")
    weights = engine.removeprefix("llama_")
    return Planner.load(
        adapter=adapter, engine="llama_cpp", engine_weights=weights, sampler=sampler, threads=threads, device="cpu"
    )


def load_realizer(threads: int):
    from planners.assets import smollm2_gguf_path
    from realizers.llamacpp import load_llama

    return load_llama(smollm2_gguf_path(), n_ctx=512, n_threads=threads, n_threads_batch=threads)


def realize(llm, prompt_ids: list[int], n: int, eos: int) -> tuple[list[int], float]:
    """Greedy: exactly n tokens after the prompt (EOS ignored), timed; returns the text up to EOS and seconds."""
    t0 = time.perf_counter()
    toks: list[int] = []
    for t in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        toks.append(int(t))
        if len(toks) >= n:
            break
    secs = time.perf_counter() - t0
    cut = toks.index(eos) if eos in toks else len(toks)
    return toks[:cut], secs


# ----------------------------------------------------------------------------- micro-benchmark


def _torch_pass(model, n: int, context: int):
    from planners.model import attention_mask

    c = model.config
    length = context + n
    valid = torch.ones(1, length, dtype=torch.bool)
    gen_start = context
    attn = attention_mask(valid, pattern="block_causal", gen_start=gen_start, block_size=max(n, 1))
    cache = model.new_cache(valid, gen_start=gen_start)
    ids = torch.randint(100, 5000, (1, length))
    with torch.inference_mode():
        model(ids[:, :context], attention_mask=attn[:, :, :context], cache=cache, cache_start=0)
    ids_n, attn_n = ids[:, context:].clone(), attn[:, :, context:]
    ids_n[:] = c.mask_token_id

    def run():
        with torch.inference_mode():
            model(ids_n, attention_mask=attn_n, cache=cache, cache_start=context)

    return run


def _llama_pass(engine, n: int, context: int):
    """One llama_decode of an n-position block (non-causal) over `context` cached final positions."""
    valid = torch.ones(1, context + n, dtype=torch.bool)
    cache = engine.new_cache(valid, gen_start=context)  # a context with room for context + n, ubatch >= 64
    cx = cache.ctx
    ids = torch.randint(100, 5000, (context + n,)).tolist()
    cx.set_causal(True)
    # (position, token, position id, logits?, keep?): the prompt stays cached (final), the block is decoded on
    # the row's scratch sequence and removed after each pass, as the engine's own steps do
    prompt = [(t, ids[t], t, t == context - 1, True) for t in range(context)]
    engine._run_rows(cx, [(0, prompt)], _Sink(), 0, split_rows=True)
    mask = engine.config.mask_token_id
    block = [(0, [(context + i, mask, context + i, True, False) for i in range(n)])]

    def run():
        cx.set_causal(False)
        engine._run_rows(cx, block, _Sink(), 0, split_rows=False)
        engine._ll.llama_memory_seq_rm(cx.mem, cx.scratch, context, -1)

    run.cache = cache  # keeps the context for this pass
    return run


class _Sink:
    def __setitem__(self, key, value) -> None:  # logits are copied out (as in a real pass) and dropped
        pass


def micro(planners: dict, positions: list[int], context: int, repeat: int) -> dict:
    times: dict = {}
    for n in positions:
        runs = {
            name: (_torch_pass if name.startswith("torch_") else _llama_pass)(pl.model, n, context)
            for name, pl in planners.items()
        }
        for name in planners:
            times[(name, n)] = []
        for r in range(repeat + 2):  # 2 warm-up rounds
            for name in list(planners) if r % 2 == 0 else list(reversed(planners)):
                t0 = time.perf_counter()
                runs[name]()
                if r >= 2:
                    times[(name, n)].append(time.perf_counter() - t0)
    return {name: {n: round(1000 * statistics.median(times[(name, n)]), 1) for n in positions} for name in planners}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.bench_planner_quality import _mean, ar_nll, pick_prompts, repeat_rate
    from hybrid.cli import parse_set
    from hybrid.config import HybridConfig
    from hybrid.runtime import sampler_config
    from planners.adapt.data import chat_prompt_ids
    from planners.assets import DEFAULT_ADAPTER, smollm2_hf_dir
    from planners.embedding import SentenceEmbedder
    from planners.loading import load_backbone

    hc = HybridConfig.load(**parse_set([f"planner.gen_length={a.gen_length}", f"planner.steps={a.gen_length}", *a.set]))
    sampler = sampler_config(hc)
    prompts = pick_prompts(a.prompts, 0, a.seed)
    planners = {}
    for e in a.engines:
        t0 = time.perf_counter()
        planners[e] = load_planner(e, sampler, a.threads, a.adapter)
        print(f"  loaded {e} in {time.perf_counter() - t0:.1f} s ({planners[e].name})", flush=True)
    tok = next(iter(planners.values())).tokenizer
    eos = tok.eos_token_id
    prompt_ids = [chat_prompt_ids(tok, p.text) for p in prompts]
    llm = load_realizer(a.threads)
    realize(llm, prompt_ids[0], 4, eos)  # warm-up
    for pl in planners.values():
        pl.plan(prompts[0].text)

    rec: dict = {e: {"seconds": [], "nfe": [], "plans": []} for e in planners}
    ar = {"seconds": [], "plans": []}
    contestants = ["realizer", *planners]
    for i, p in enumerate(prompts):
        k = i % len(contestants)
        for name in contestants[k:] + contestants[:k]:  # rotate the order per prompt
            if name == "realizer":
                toks, secs = realize(llm, prompt_ids[i], a.gen_length, eos)
                ar["seconds"].append(secs)
                ar["plans"].append(toks)
                continue
            r = planners[name].plan(p.text)
            rec[name]["seconds"].append(r.stats["seconds"])
            rec[name]["nfe"].append(r.stats["nfe"])
            rec[name]["plans"].append(r.tokens)
        print(f"  prompt {i + 1}/{len(prompts)}", flush=True)

    # quality (untimed): the untouched AR model scores each engine's plans
    scorer = load_backbone(smollm2_hf_dir(), adapter=DEFAULT_ADAPTER, mask_token_id=16)
    embed = SentenceEmbedder()
    ref_texts = [tok.decode(r, skip_special_tokens=True) for r in ar["plans"]]
    ref_emb = embed(ref_texts)
    ar_sec = statistics.mean(ar["seconds"])
    rows = [
        {
            "engine": "realizer (llama.cpp Q4_1)",
            "seconds": round(ar_sec, 3),
            "nfe": a.gen_length,
            "tokens_per_pass": 1.0,
            "ms_per_pass": round(1000 * ar_sec / a.gen_length, 1),
            "ratio": 1.0,
            "ar_nll": round(_mean([ar_nll(scorer, ids, r) for ids, r in zip(prompt_ids, ar["plans"], strict=True)]), 3),
            "cosine_vs_ar": 1.0,
            "repeat_rate": round(statistics.mean(map(repeat_rate, ar["plans"])), 3),
            "mean_len": round(statistics.mean(map(len, ar["plans"])), 1),
        }
    ]
    for name, r in rec.items():
        secs, nfe = statistics.mean(r["seconds"]), statistics.mean(r["nfe"])
        texts = [tok.decode(t, skip_special_tokens=True) for t in r["plans"]]
        cos = [float(x @ y) for x, y in zip(embed(texts), ref_emb, strict=True)]
        rows.append(
            {
                "engine": name,
                "seconds": round(secs, 3),
                "nfe": round(nfe, 1),
                "tokens_per_pass": round(a.gen_length / nfe, 2),
                "ms_per_pass": round(1000 * secs / nfe, 1),
                "ratio": round(secs / ar_sec, 2),
                "ar_nll": round(
                    _mean([ar_nll(scorer, ids, t) for ids, t in zip(prompt_ids, r["plans"], strict=True)]), 3
                ),
                "cosine_vs_ar": round(statistics.mean(cos), 3),
                "repeat_rate": round(statistics.mean(map(repeat_rate, r["plans"])), 3),
                "mean_len": round(statistics.mean(map(len, r["plans"])), 1),
                "same_plans_as_torch_fp32": (
                    sum(x == y for x, y in zip(r["plans"], rec["torch_fp32"]["plans"], strict=True))
                    if "torch_fp32" in rec
                    else None
                ),
            }
        )
    cpu = _cpu()
    result: dict = {"prompts": len(prompts), "gen_length": a.gen_length, "threads": a.threads, "cpu": cpu, "rows": rows}
    result["adapter"] = a.adapter or "shipped"
    result["sampler"] = {k: getattr(sampler, k) for k in ("commit", "threshold", "block_length", "cache", "steps")}
    result["extra_bufts"] = {n: getattr(p.model, "extra_bufts", None) for n, p in planners.items()}
    cols = ["engine", "seconds", "nfe", "tokens_per_pass", "ms_per_pass", "ratio", "ar_nll", "cosine_vs_ar",
            "repeat_rate", "mean_len"]  # fmt: skip
    print(f"\n{len(prompts)} held-out prompts, {a.gen_length}-token plans, {a.threads} thread(s), {cpu}")
    print(" | ".join(cols + ["same_plans_as_torch_fp32"]))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols + ["same_plans_as_torch_fp32"]))
    if not a.no_micro:
        result["micro_ms"] = micro(planners, a.positions, a.context, a.repeat)
        print(f"\nms per forward pass (median of {a.repeat}), n positions over a cache of {a.context}:")
        print(" | ".join(["engine", *map(str, a.positions)]))
        for name, row in result["micro_ms"].items():
            print(" | ".join([name, *(str(row[n]) for n in a.positions)]))
    print(json.dumps(result))
    return result


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
