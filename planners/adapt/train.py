"""Adaptation training loop: LoRA + learned mask embedding on a frozen AR backbone, block-diffusion SFT.

`train(cfg, model, train_rows, heldout_rows)`: AdamW on the adapter only, linear warmup then cosine decay
over whichever budget ends first (steps or wall time — the schedule follows the budget, so a run that must
stop at a deadline still anneals), gradient clipping, batches packed to a token budget from length-sorted
buckets, periodic held-out evaluation with early stopping on held-out masked accuracy (the best adapter is
kept: with scarce data, training loss falls long after held-out accuracy stops rising), and
resumable checkpoints (adapter + optimiser + step + tokens + elapsed time + RNG + data position) written
atomically every few minutes. The final adapter is written with `planners.loading.save_adapter`.

Knows no tokenizer and no data source: rows are (prompt ids, block-aligned response ids).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from planners.adapt.evaluate import evaluate
from planners.adapt.objective import CleanAttention, loss_fn, make_batch
from planners.loading import save_adapter
from planners.model import DiffusionBackbone

Row = tuple[list[int], list[int]]


@dataclass
class TrainConfig:
    out: str
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_steps: int | None = None
    max_seconds: float | None = None  # training wall-time budget (the schedule's clock)
    deadline: float | None = None  # absolute time.time() at which to stop regardless
    token_budget: int = 2048  # real tokens per batch (two-copy rows count both copies)
    max_rows: int = 16
    grad_clip: float = 1.0
    eps: float = 1e-3
    ar_weight: float = 0.0
    certainty_weight: float = 0.0  # dParallel's certainty-forcing term (objective.certainty_loss); 0 = off
    certainty_temperature: float = 0.5
    clean: CleanAttention = "block_causal"
    eval_every: int = 50  # steps
    eval_seconds: float | None = None  # also evaluate when this much time passed since the last eval
    patience: int = 4  # evals without held-out improvement before stopping
    ckpt_seconds: float = 240.0
    seed: int = 0
    threads: int | None = 2
    bf16: bool = False  # autocast to bfloat16 (adapter and optimiser stay float32): ~1.8x on AVX512-BF16, the
    # usual setting on a GPU
    device: str = "cpu"  # where the model is (the caller moves it): batches follow it
    eval_rows: int | None = None  # held-out rows used by the periodic eval (all of them by default)
    keep: str = "best"  # which adapter to write: "best" (held-out masked accuracy) or "last" (certainty runs trade
    # a little masked accuracy for confidence, so the best-accuracy one would undo them)
    progress: bool = True
    meta: dict = field(default_factory=dict)  # merged into the adapter's sidecar JSON


def trainable_parameters(model: DiffusionBackbone) -> list[torch.nn.Parameter]:
    """Freeze everything but LoRA matrices and the mask embedding; return those."""
    names = set(model.adapter_state_dict())
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    if not params:
        raise ValueError("the model has no adapter parameters: add_lora first")
    return params


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup, then cosine from lr to min_lr_ratio·lr over the step or time budget (whichever is nearer)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    fracs = []
    if cfg.max_steps:
        fracs.append((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1))
    if cfg.max_seconds:
        fracs.append(elapsed / cfg.max_seconds)
    frac = min(max(fracs, default=0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def epoch_batches(rows: list[Row], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """Row indices per batch for one epoch: shuffled, bucketed by length (64 rows, or max_rows if more), packed to
    the token budget."""
    rng = random.Random(cfg.seed * 1000003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    size = lambda i: len(rows[i][0]) + 2 * len(rows[i][1])  # noqa: E731
    batches: list[list[int]] = []
    span = max(64, cfg.max_rows)
    for k in range(0, len(order), span):
        bucket = sorted(order[k : k + span], key=size)
        cur: list[int] = []
        for i in bucket:
            longest = max([size(j) for j in cur] + [size(i)])
            if cur and (longest * (len(cur) + 1) > cfg.token_budget or len(cur) >= cfg.max_rows):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(path: Path, model, opt, state: dict, gen: torch.Generator) -> None:
    _atomic_save(
        {
            "adapter": model.adapter_state_dict(),
            "optimizer": opt.state_dict(),
            "state": state,
            "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state(), "python": random.getstate()},
        },
        path,
    )


def load_state(path: Path, model, opt, gen: torch.Generator) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["adapter"], strict=False)
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])
    gen.set_state(ck["rng"]["gen"])
    random.setstate(ck["rng"]["python"])
    return ck["state"]


# ----------------------------------------------------------------------------- loop


def train(
    cfg: TrainConfig,
    model: DiffusionBackbone,
    train_rows: list[Row],
    heldout_rows: list[Row],
    *,
    resume: bool = False,
    reload_rows=None,
    log=print,
) -> dict:
    """Run (or resume) training; write `out/adapter.safetensors` (+ .json) and return the final state dict
    (step, tokens, elapsed, history, best held-out metrics). `reload_rows()`, if given, is called at every
    epoch start: training then sees examples a concurrent distillation appended since."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    best_path = out / "best_adapter.pt"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    c = model.config
    state = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "tokens": 0,
        "response_tokens": 0,
        "elapsed": 0.0,
        "history": [],
        "best": None,
        "bad_evals": 0,
        "stopped": None,
    }
    if resume and ckpt.exists():
        state = load_state(ckpt, model, opt, gen)
        log(f"resumed from {ckpt}: step {state['step']}, {state['elapsed'] / 60:.1f} min trained")
    n_trainable = sum(p.numel() for p in params)
    log(
        f"train rows {len(train_rows)}, held-out rows {len(heldout_rows)}, trainable params {n_trainable:,}, "
        f"block {c.block_size}, clean attention {cfg.clean}, ar_weight {cfg.ar_weight}"
    )

    device_type = torch.device(cfg.device).type

    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def do_eval(tag: str) -> dict:
        with autocast():
            m = evaluate(model, heldout_rows[: cfg.eval_rows], clean=cfg.clean, with_loss=False)
        rec = {"step": state["step"], "tokens": state["tokens"], "elapsed": round(state["elapsed"], 1), **m}
        state["history"].append({"eval": rec})
        log(f"[eval {tag}] " + json.dumps(rec))
        if state["best"] is None or m["acc_mean"] > state["best"]["acc_mean"]:
            state["best"] = rec
            state["bad_evals"] = 0
            torch.save(model.adapter_state_dict(), best_path)
        else:
            state["bad_evals"] += 1
        return m

    model.train()
    if state["step"] == 0 and not state["history"]:
        do_eval("start")
    session_start = time.time() - state["elapsed"]
    last_ckpt = last_eval = time.time()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="adapt", disable=not cfg.progress, dynamic_ncols=True)
    ema = None
    stop = None
    while stop is None:
        if reload_rows is not None and state["batch_in_epoch"] == 0:
            fresh = reload_rows()
            if len(fresh) != len(train_rows):
                log(f"epoch {state['epoch']}: {len(fresh)} training rows (was {len(train_rows)})")
            train_rows = fresh
        batches = epoch_batches(train_rows, cfg, state["epoch"])
        while state["batch_in_epoch"] < len(batches):
            now = time.time()
            state["elapsed"] = now - session_start
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                stop = "max_steps"
            elif cfg.max_seconds is not None and state["elapsed"] >= cfg.max_seconds:
                stop = "time budget"
            elif cfg.deadline is not None and now >= cfg.deadline:
                stop = "deadline"
            if stop:
                break
            idx = batches[state["batch_in_epoch"]]
            batch = make_batch(
                [train_rows[i] for i in idx],
                block_size=c.block_size,
                mask_id=c.mask_token_id,
                pad_id=c.eos_token_id,
                generator=gen,
                eps=cfg.eps,
                clean=cfg.clean,
                ar_term=cfg.ar_weight > 0,
            )
            lr = lr_at(cfg, state["step"], state["elapsed"])
            for gr in opt.param_groups:
                gr["lr"] = lr
            with autocast():
                loss, st = loss_fn(
                    model,
                    batch,
                    ar_weight=cfg.ar_weight,
                    certainty_weight=cfg.certainty_weight,
                    certainty_temperature=cfg.certainty_temperature,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["tokens"] += batch.n_tokens
            state["response_tokens"] += batch.n_response
            ema = st["loss"] if ema is None else 0.95 * ema + 0.05 * st["loss"]
            tok_s = state["tokens"] / max(time.time() - session_start, 1e-6)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", ep=state["epoch"], tok_s=f"{tok_s:.0f}")
            if state["step"] % 10 == 0:
                state["history"].append(
                    {
                        "step": state["step"],
                        "loss_ema": round(ema, 4),
                        **{k: round(v, 4) for k, v in st.items()},
                        "lr": lr,
                        "grad_norm": round(gnorm, 3),
                        "elapsed": round(time.time() - session_start, 1),
                    }
                )
            due_eval = state["step"] % cfg.eval_every == 0 or (
                cfg.eval_seconds is not None and time.time() - last_eval >= cfg.eval_seconds
            )
            if due_eval:
                do_eval(f"step {state['step']}")
                last_eval = time.time()
                if state["bad_evals"] >= cfg.patience:
                    stop = f"early stop: no held-out improvement in {cfg.patience} evals"
                    break
            if time.time() - last_ckpt >= cfg.ckpt_seconds:
                save_state(ckpt, model, opt, state, gen)
                last_ckpt = time.time()
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    state["elapsed"] = time.time() - session_start
    state["stopped"] = stop
    log(f"stopped: {stop} at step {state['step']} after {state['elapsed'] / 60:.1f} min")
    if not stop.startswith("early stop"):
        do_eval("final")
    save_state(ckpt, model, opt, state, gen)
    if cfg.keep == "best" and best_path.exists():  # ship the best held-out adapter, not the last
        model.load_state_dict(torch.load(best_path, map_location="cpu"), strict=False)
    meta = {
        "training": {
            "objective": "block-diffusion SFT (two-copy layout), 1/t-weighted masked CE, Dream shift"
            + (
                f" + {cfg.certainty_weight} x certainty-forcing entropy at T={cfg.certainty_temperature} "
                "(dParallel, arXiv 2509.26488)"
                if cfg.certainty_weight > 0
                else ""
            ),
            "kept": cfg.keep,
            "clean_attention": cfg.clean,
            "ar_weight": cfg.ar_weight,
            "steps": state["step"],
            "epochs": round(
                state["epoch"] + state["batch_in_epoch"] / max(len(epoch_batches(train_rows, cfg, 0)), 1), 2
            ),
            "tokens_seen": state["tokens"],
            "response_tokens_seen": state["response_tokens"],
            "wall_time_s": round(state["elapsed"], 1),
            "stopped": stop,
            "train_rows": len(train_rows),
            "heldout_rows": len(heldout_rows),
            "hardware": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "torch": torch.__version__,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("meta",)},
        },
        "heldout_best": state["best"],
        **cfg.meta,
    }
    save_adapter(model, out / "adapter.safetensors", meta=meta)
    (out / "history.json").write_text(json.dumps(state["history"], indent=1))
    return state
