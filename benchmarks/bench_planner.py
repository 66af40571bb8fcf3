"""Planner benchmark: tokens/s, NFE and time per step of the denoising sampler, by KV cache and commit rule.

    python -m benchmarks.bench_planner --threads 1               # tiny random models on CPU (the default)
    python -m benchmarks.bench_planner --model PATH [--mask-token-id N] [--attention block_causal --block-size 8]
    python -m benchmarks.bench_planner --llada-8b-random         # CUDA: LLaDA-8B shape, random bf16 weights

Every model runs the same synthetic prompts (random token ids: speed does not depend on meaning) under
cache in {none, prefix, dual} x commit in {static, threshold}; the baseline (no cache, static) is measured in the
same run and every row prints its speed-up over it. One untimed warm-up per configuration, then the median
of --repeats runs. On CUDA, per-step time is also set against the weight-read floor: every forward reads all
weights once, so a step cannot beat weight bytes / memory bandwidth at small batch.
Random weights are not confident, so `threshold` commits about one token per step on them (its worst case);
its gain on a trained planner depends on that planner's confidence. Prints a table, JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from planners.model import BackboneConfig, DiffusionBackbone
from planners.sampler import SamplerConfig, sample

BANDWIDTH_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def tiny_models() -> dict[str, DiffusionBackbone]:
    """Random models a little larger than the tests' (CPU-sized): a LLaDA layout and a block-causal adapted AR."""
    torch.manual_seed(0)
    common = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=8)
    llada = BackboneConfig(arch="llada", mask_token_id=8191, eos_token_id=1, **common)
    adapted = BackboneConfig(
        arch="llama", mask_token_id=8191, eos_token_id=1, shift=True, attention="block_causal", block_size=16,
        learned_mask_embedding=True, tie_word_embeddings=True, **{**common, "num_kv_heads": 4},
    )  # fmt: skip
    return {
        "tiny-llada-full": DiffusionBackbone(llada).eval(),
        "tiny-adapted-block16": DiffusionBackbone(adapted).eval(),
    }


def llada_8b_random(device: str) -> DiffusionBackbone:
    """LLaDA-8B's shape (config.json of GSAI-ML/LLaDA-8B-Instruct) with random bf16 weights, built on the device."""
    cfg = BackboneConfig(
        arch="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
        num_kv_heads=32, mask_token_id=126336, eos_token_id=126081, extra_eos_ids=(126348,), rope_theta=500000.0,
    )  # fmt: skip
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = DiffusionBackbone(cfg)
    finally:
        torch.set_default_dtype(old)
    model.rotary.__init__(cfg.dim_head, cfg.rope_theta)  # float32 inverse frequencies
    return model.to(device).eval()


def bandwidth_gbs(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbs in BANDWIDTH_GBS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return gbs
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, prompts, cfg: SamplerConfig, repeats: int) -> dict:
    device = next(model.parameters()).device
    sample(model, prompts, cfg)  # warm-up (allocator, kernels, caches)
    runs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = sample(model, prompts, cfg)
        _sync(device)
        runs.append((time.perf_counter() - t0, out))
    seconds = statistics.median(r[0] for r in runs)
    out = runs[0][1]
    tokens = len(prompts) * cfg.gen_length
    return dict(
        cache=cfg.cache,
        commit=cfg.commit,
        seconds=round(seconds, 4),
        tokens_per_s=round(tokens / seconds, 1),
        nfe=out.nfe,
        steps=out.steps,
        tokens_per_step=round(tokens / max(out.steps, 1), 2),
        ms_per_step=round(1e3 * seconds / max(out.steps, 1), 2),
    )


def bench_model(name, model, args) -> dict:
    mc = model.config
    device = next(model.parameters()).device
    block = mc.block_size if mc.attention == "block_causal" else args.block_length
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, mc.vocab_size - 1, (args.prompt_length,), generator=g).tolist()] * args.batch
    rows = []
    for commit in ("static", "threshold"):
        for cache in ("none", "prefix", "dual"):
            cfg = SamplerConfig(
                gen_length=args.gen_length, steps=args.steps, block_length=block, commit=commit, cache=cache,
                threshold=args.threshold, eos_early_stop="off",
            )  # fmt: skip
            rows.append(run(model, prompts, cfg, args.repeats))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_baseline"] = round(r["tokens_per_s"] / base, 2)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gbs = bandwidth_gbs(device, args.bandwidth_gbs)
    floor_ms = 1e3 * weight_bytes / (gbs * 1e9) if gbs else None
    if floor_ms:
        for r in rows:
            r["x_floor"] = round(r["ms_per_step"] / floor_ms, 2)
    print(f"\n{name}: {weight_bytes / 1e6:.1f} MB of weights on {device}, attention={mc.attention}, block={block}, "
          f"batch={args.batch}, prompt={args.prompt_length}, gen={args.gen_length}, steps<={args.steps}"
          + (f", weight-read floor {floor_ms:.2f} ms/step at {gbs:.0f} GB/s" if floor_ms else ""))  # fmt: skip
    print(f"{'commit':10s} {'cache':7s} {'tok/s':>9s} {'x base':>7s} {'NFE':>5s} {'tok/step':>8s} {'ms/step':>8s}"
          + (f" {'x floor':>8s}" if floor_ms else ""))  # fmt: skip
    for r in rows:
        print(f"{r['commit']:10s} {r['cache']:7s} {r['tokens_per_s']:9.1f} {r['x_baseline']:7.2f} {r['nfe']:5d} "
              f"{r['tokens_per_step']:8.2f} {r['ms_per_step']:8.2f}"
              + (f" {r['x_floor']:8.2f}" if floor_ms else ""), flush=True)  # fmt: skip
    return dict(model=name, weight_bytes=weight_bytes, device=str(device), attention=mc.attention, block=block,
                bandwidth_gbs=gbs, floor_ms_per_step=floor_ms and round(floor_ms, 3), rows=rows)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint directory or .gguf (load_backbone)")
    p.add_argument(
        "--mask-token-id", type=int, default=None, help="for AR checkpoints: the vocabulary entry used as mask"
    )
    p.add_argument("--attention", default=None, choices=["full", "block_causal", "causal"])
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--llada-8b-random", action="store_true", help="LLaDA-8B-shaped random bf16 model on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-length", type=int, default=16, help="for full-attention models")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the weight-read floor")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.llada_8b_random:
        if not a.device.startswith("cuda"):
            raise SystemExit("--llada-8b-random needs a CUDA device (16 GB of bf16 weights)")
        models = {"llada-8b-random-bf16": llada_8b_random(a.device)}
    elif a.model:
        from planners.loading import load_backbone

        dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
        models = {os.path.basename(a.model.rstrip("/")): load_backbone(
            a.model, dtype=dtype, device=a.device, mask_token_id=a.mask_token_id, attention=a.attention,
            block_size=a.block_size)}  # fmt: skip
    else:
        dtype = getattr(torch, a.dtype or "float32")
        models = {k: m.to(device=a.device, dtype=dtype) for k, m in tiny_models().items()}
    load_before = os.getloadavg()
    results = [bench_model(name, m, a) for name, m in models.items()]
    env = dict(
        machine=platform.machine(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
        loadavg_1m_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # neighbours share the CPU
    )
    settings = {k: getattr(a, k) for k in ("batch", "prompt_length", "gen_length", "steps", "threshold", "repeats")}
    print(json.dumps(dict(bench="planner", settings=settings, env=env, results=results)))


if __name__ == "__main__":
    main()
