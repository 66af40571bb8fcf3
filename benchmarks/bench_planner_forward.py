"""Milliseconds per forward pass of the embedded planner's torch backbone: LoRA unmerged vs merged, fp32 vs bf16.

One pass as the sampler runs it with the prefix KV cache: `n` query positions (1 / 8 / 16: a single token, one
block, two blocks) attending over a cache of `context` positions (prompt + plan span), block-causal mask,
batch 1, one thread by default. Median of `--repeat` timed calls after warm-up. The same run checks that
merging changes no token: static and threshold plans for a few held-out prompts, merged vs unmerged (fp32).

    python -m benchmarks.bench_planner_forward
    python -m benchmarks.bench_planner_forward --dtypes float32 --repeat 20

Prints a table; the whole result is JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, nargs="*", default=[1, 8, 16])
    p.add_argument("--context", type=int, default=112, help="cache length: prompt + plan span")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-prompts", type=int, default=4, help="held-out prompts for the token check (0: skip)")
    return p.parse_args(argv)


def cpu_flags() -> dict:
    flags: set[str] = set()
    name = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keys = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": name, **{k: k in flags for k in keys}}


@torch.no_grad()
def time_forward(model, n: int, context: int, repeat: int) -> tuple[float, float]:
    """Median ms of one cached forward of n positions at the end of a `context`-long sequence: (wall, CPU).

    CPU = this thread's CPU time (`time.thread_time`): on a machine shared with other jobs, wall time includes
    waiting for a core; with one torch thread the thread's CPU time is the pass's cost."""
    from planners.model import KVCache, attention_mask

    c = model.config
    dtype = next(model.parameters()).dtype
    ids = torch.randint(100, 1000, (1, context))
    gen_start = context - 64 if context > 64 else 0
    valid = torch.ones_like(ids, dtype=torch.bool)
    attn = attention_mask(valid, pattern=c.attention, gen_start=gen_start, block_size=c.block_size)
    cache = KVCache.allocate(c, 1, context, dtype=dtype, device="cpu")
    model(ids, attention_mask=attn, cache=cache, cache_start=0)  # fill the cache (prefill)
    a = context - n
    pos = torch.arange(a, context)[None]
    wall, cpu = [], []
    for i in range(repeat + 2):
        t0, c0 = time.perf_counter(), time.thread_time()
        model(ids[:, a:], attention_mask=attn[:, :, a:], position_ids=pos, cache=cache, cache_start=a)
        if i >= 2:  # warm-up
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def token_check(base, adapter, n_prompts: int) -> dict:
    """Plans from the unmerged and the merged fp32 model must be the same tokens (static and threshold)."""
    from transformers import AutoTokenizer

    from benchmarks.bench_planner_quality import pick_prompts
    from planners.adapt.data import chat_prompt_ids
    from planners.loading import load_backbone
    from planners.sampler import SamplerConfig, sample

    tok = AutoTokenizer.from_pretrained(str(base))
    prompts = [chat_prompt_ids(tok, p.text) for p in pick_prompts(n_prompts, 0)]
    out = {}
    unmerged = load_backbone(base, adapter=adapter, mask_token_id=16)
    merged = load_backbone(base, adapter=adapter, mask_token_id=16, merge_adapter=True)
    for commit in ("static", "threshold"):
        cfg = SamplerConfig(gen_length=32, steps=32, block_length=8, commit=commit, cache="prefix")
        a, b = sample(unmerged, prompts, cfg), sample(merged, prompts, cfg)
        out[commit] = {"equal": bool(torch.equal(a.tokens, b.tokens)), "nfe": [a.nfe, b.nfe]}
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from planners.assets import DEFAULT_ADAPTER, smollm2_hf_dir
    from planners.loading import load_backbone

    base = smollm2_hf_dir()
    res: dict = {"machine": cpu_flags(), "threads": a.threads, "context": a.context, "torch": torch.__version__}
    rows = []
    for dt in a.dtypes:
        for merge in (False, True):
            model = load_backbone(
                base, adapter=DEFAULT_ADAPTER, mask_token_id=16, dtype=getattr(torch, dt), merge_adapter=merge
            )
            row = {"dtype": dt, "lora": "merged" if merge else "unmerged"}
            for n in a.positions:
                wall, cpu = time_forward(model, n, a.context, a.repeat)
                row[f"ms@{n}"], row[f"wall_ms@{n}"] = round(cpu, 1), round(wall, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    res["rows"] = rows
    if a.check_prompts:
        res["tokens_unchanged"] = token_check(base, DEFAULT_ADAPTER, a.check_prompts)
    print(f"\n{res['machine']}, {a.threads} thread(s), cache of {a.context} positions, median of {a.repeat}")
    print("dtype | LoRA | " + " | ".join(f"{n} pos (CPU ms)" for n in a.positions))
    for r in rows:
        print(f"{r['dtype']} | {r['lora']} | " + " | ".join(str(r[f"ms@{n}"]) for n in a.positions))
    if "tokens_unchanged" in res:
        print(f"merged vs unmerged tokens: {res['tokens_unchanged']}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
