"""Sampler-statistics benchmark: the fused Triton kernel vs the eager PyTorch reference vs torch.compile of it.

    python -m benchmarks.bench_kernels                       # on a GPU: V x L grid below, bf16, greedy
    python -m benchmarks.bench_kernels --temperature 0.8     # sampling (kernel: in-kernel Philox noise)
    python -m benchmarks.bench_kernels --sweep               # also time other tile / warp choices
    python -m benchmarks.bench_kernels --quick               # small sizes; on CPU the torch paths only
    python -m benchmarks.bench_kernels --sass                # no GPU needed: compile for sm_90a, inspect

Per (V, L) it times `token_stats` on bf16 logits (L, V) with the mask id excluded, as the planner calls it.
Bytes counted = the logits, read once: the least any implementation must move, so GB/s over the device's
peak bandwidth (--peak-gbps; H100 SXM 3350) says how close a path is to the memory floor. Speed-ups are
against eager measured in the same run. On a GPU: CUDA events around a loop of calls that rotates over
enough input buffers to defeat the 50 MB L2, median of several repeats. On a CPU there is no GPU to time:
it says so and times the PyTorch paths at small sizes (the Triton interpreter is only a correctness tool,
--interpret adds it anyway). Prints a table, then the whole result as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from kernels import sampling_stats
from kernels.sampling_stats import HAS_TRITON, KernelConfig, token_stats_reference, token_stats_triton

VOCABS = [49152, 126464, 151936]  # SmolLM2, LLaDA-8B, Dream-7B / Qwen2.5
ROWS = [32, 256, 1024]  # positions per denoising step: one block, a long answer, a batch of answers
QUICK_VOCABS = [4096, 32768]
QUICK_ROWS = [8, 32]
SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]  # (block_v, num_warps)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_DEFEAT_BYTES = 256 << 20  # rotate inputs until this many bytes are touched between reuses


def _time_cuda(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], reps: int) -> float:
    """Median ms per call: CUDA events around len(inputs) calls (one per buffer), `reps` times."""
    for x in inputs[:2]:
        fn(x)  # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in inputs:
            fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    return statistics.median(times)


def _time_cpu(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], reps: int) -> float:
    fn(inputs[0])
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _methods(args, on_gpu: bool) -> dict[str, Callable[..., object]]:
    kw = dict(temperature=args.temperature, exclude_ids=None)
    seed = 1234 if args.temperature > 0 else None
    methods: dict[str, Callable[..., object]] = {
        "eager": lambda x, ex: token_stats_reference(x, seed=seed, **{**kw, "exclude_ids": ex}),
    }
    if not args.no_compile:
        compiled = torch.compile(token_stats_reference, dynamic=False)
        methods["compile"] = lambda x, ex: compiled(x, seed=seed, **{**kw, "exclude_ids": ex})
    if HAS_TRITON and (on_gpu or args.interpret):
        methods["triton"] = lambda x, ex: token_stats_triton(x, seed=seed, **{**kw, "exclude_ids": ex})
        if args.sweep and on_gpu:
            for block_v, warps in SWEEP:
                cfg = KernelConfig(block_v=block_v, num_warps=warps)
                methods[f"triton[b{block_v},w{warps}]"] = lambda x, ex, cfg=cfg: token_stats_triton(
                    x, seed=seed, config=cfg, **{**kw, "exclude_ids": ex}
                )
    return methods


def sass_report(arch: int = 90) -> list[dict]:
    """Compile the main kernel for sm_`arch` without a GPU (Triton's bundled ptxas) and read its machine code.

    Per variant: registers, spilled bytes, instructions in the streaming loop per logit, and whether loads
    are 128-bit - what METHOD.md says to read before spending device time. Launch-time specialisation is
    mimicked (pointers, strides and V divisible by 16; one excluded id; the launcher's tile and warps).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = sampling_stats._token_stats_kernel
    names = kernel.arg_names
    bindir = os.path.join(os.path.dirname(sampling_stats.triton.__file__), "backends", "nvidia", "bin")
    rows = []
    for dtype, elem in (("bf16", 2), ("fp32", 4)):
        for noise in (0, 1, 2):
            block_v, warps, _, split_cols = sampling_stats._launch_config(
                1024, 126464, elem, noise, torch.device("cpu"), KernelConfig()
            )
            const = dict(BLOCK_V=block_v, STRIPE=triton_next_pow2(split_cols // block_v), N_EXCLUDE=1,
                         NOISE=noise, SINGLE_SPLIT=True, FAST_LOG=True)  # fmt: skip
            ptr = dict(X=f"*{dtype}", U="*fp32", EX="*i64", TOK="*i64", PROB="*fp32", ENT="*fp32", MARG="*fp32",
                       PF="*fp32", PI="*i32")  # fmt: skip
            sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n == "scale2" else "i32") for n in names}
            div16 = [i for i, n in enumerate(names) if n in ptr or n in ("stride_x", "stride_u", "V", "split_cols")]
            attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
            compiled = sampling_stats.triton.compile(
                ASTSource(kernel, sig, const, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": 1, "enable_fp_fusion": True},  # as the launcher
            )
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                res = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True)
                sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
            usage = dict(re.findall(r"(REG|LOCAL):(\d+)", res.stdout))
            addr = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?P\d BRA [^;]*|[^;]*)", sass)]
            loop = max(
                (a - int(m.group(1), 16) for a, t in addr if (m := re.search(r"BRA (?:`\(\S+\) )?0x([0-9a-f]+)", t))
                 and int(m.group(1), 16) < a),
                default=0,
            ) // 16  # fmt: skip
            per_tile = block_v // (32 * warps)  # logits per thread per tile; the loop folds 3 tiles
            rows.append(dict(dtype=dtype, noise=noise, block_v=block_v, num_warps=warps, regs=int(usage["REG"]),
                             local_bytes=int(usage["LOCAL"]), loop_instr_per_logit=round(loop / (3 * per_tile), 1),
                             ldg128=len(re.findall(r"LDG\.E[.A-Z]*\.128", sass)),
                             mufu_lg2=len(re.findall(r"MUFU\.LG2", sass))))  # fmt: skip
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", help=f"vocabulary sizes (default {VOCABS})")
    p.add_argument("--rows", type=int, nargs="+", help=f"rows = positions L (default {ROWS})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--temperature", type=float, default=0.0, help="0: argmax; > 0: Gumbel-max sampling")
    p.add_argument("--peak-gbps", type=float, default=None, help="device memory bandwidth (GPU default 3350)")
    p.add_argument("--quick", action="store_true", help=f"small sizes: V {QUICK_VOCABS}, L {QUICK_ROWS}")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--interpret", action="store_true", help="on CPU, also time the Triton interpreter")
    p.add_argument("--sweep", action="store_true", help="on GPU, also time the tile / warp choices in SWEEP")
    p.add_argument("--reps", type=int, default=None, help="timed repeats (GPU 20, CPU 5)")
    p.add_argument("--sass", action="store_true", help="compile for sm_90a offline and report; no timing")
    args = p.parse_args(argv)
    if args.sass:
        summary = dict(arch="sm_90a", variants=sass_report())
        print(json.dumps(summary))
        return summary

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    notes = []
    if on_gpu:
        device_name = torch.cuda.get_device_name(device)
        peak = args.peak_gbps or 3350.0
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        peak = args.peak_gbps
        notes.append("no GPU present: PyTorch paths on CPU, small sizes; the kernel numbers need a GPU")
        print(f"# {notes[0]}", flush=True)
    quick = args.quick or not on_gpu
    vocabs = args.vocab or (QUICK_VOCABS if quick else VOCABS)
    rows_list = args.rows or (QUICK_ROWS if quick else ROWS)
    dtype = DTYPES[args.dtype]
    reps = args.reps or (20 if on_gpu else 5)
    methods = _methods(args, on_gpu)
    print(f"# {device_name}; {args.dtype} logits; temperature {args.temperature}; peak {peak or 'n/a'} GB/s")

    header = f"{'V':>7} {'L':>5} {'method':<22} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'x eager':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for vocab in vocabs:
        mask_id = vocab - 128  # a mask id near the end of the vocabulary, as in LLaDA / Dream
        ex = torch.tensor([mask_id], device=device)
        for rows in rows_list:
            nbytes = rows * vocab * torch.empty((), dtype=dtype).element_size()
            n_buf = max(2, min(32, math.ceil(L2_DEFEAT_BYTES / nbytes))) if on_gpu else 2
            gen = torch.Generator(device=device).manual_seed(0)
            inputs = [(torch.randn(rows, vocab, device=device, generator=gen) * 4).to(dtype) for _ in range(n_buf)]
            check = methods["eager"](inputs[0], ex)
            eager_ms = None
            for name, fn in methods.items():
                if name.startswith("triton") and not on_gpu and rows * vocab > 64 * 4096:
                    continue  # the interpreter at this size would take minutes
                out = fn(inputs[0], ex)
                agree = (out.token == check.token).float().mean().item() if args.temperature == 0 else None
                timer = _time_cuda if on_gpu else _time_cpu
                ms = timer(lambda x, fn=fn, ex=ex: fn(x, ex), inputs, reps)
                eager_ms = ms if name == "eager" else eager_ms
                gbps = nbytes / ms / 1e6
                row = dict(vocab=vocab, rows=rows, method=name, ms=round(ms, 4), gbps=float(f"{gbps:.4g}"),
                           pct_peak=round(100 * gbps / peak, 1) if peak else None,
                           speedup_vs_eager=round(eager_ms / ms, 2) if eager_ms else None,
                           token_agreement=agree)  # fmt: skip
                results.append(row)
                pct = f"{row['pct_peak']:.1f}" if peak else "n/a"
                print(f"{vocab:>7} {rows:>5} {name:<22} {ms:>9.4f} {gbps:>8.3g} {pct:>7} {row['speedup_vs_eager']:>8}")
                if agree is not None and agree < 1.0:
                    notes.append(f"{name} V={vocab} L={rows}: argmax agrees with eager on {agree:.4f} of rows")
            del inputs
    for note in notes[0 if on_gpu else 1 :]:
        print(f"# {note}")
    summary = dict(device=device_name, gpu=on_gpu, peak_gbps=peak, dtype=args.dtype, temperature=args.temperature,
                   bytes="logits read once", torch=torch.__version__, results=results, notes=notes)  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
