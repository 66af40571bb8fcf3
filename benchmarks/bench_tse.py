"""Temporal semantic entropy as a signal: does TSE predict a wrong final answer on checkable questions?

The planner answers short arithmetic word problems itself (the prompt is the question, nothing else; it
writes `--gen-length` tokens in blocks of 8) with its trajectory recorded. Each trajectory is scored by
`planners.tse.score_trajectory` with the "last_number" extractor and the "exact" clusterer, and we report:

  - final accuracy: the last number in the plan text equals the known answer;
  - vote accuracy: the temporal self-consistency vote (weighted majority over the x0-hat answers of the
    steps after the skip) equals the answer — zero extra forward passes;
  - AUROC of TSE for predicting a WRONG final answer (Mann-Whitney U, ties count 1/2; "undefined" when every
    answer is right or every answer is wrong), and the same for the companion signals flip rate and mean
    token entropy;
  - oracle: the right answer appears at some step after the skip (the ceiling for any vote over time).

Several seeds: seed s draws its own problem set (`make_problems(n, seed=s)`, unless --same-problems); with
`--temperature` > 0 it also samples with a sampler seed derived from (s, problem index). The default is greedy
decoding (the planner's best accuracy), so the spread over seeds is the spread over problem sets. Per-seed
rows, mean ± std over seeds, and percentile bootstrap 95% CIs over all (seed, problem) items pooled.

    python -m benchmarks.bench_tse --smoke                                  # tiny random model, seconds
    python -m benchmarks.bench_tse --n 40 --seeds 3                         # the shipped planner
    python -m benchmarks.bench_tse --adapter runs/adapt/best_adapter.pt     # a training checkpoint
    python -m benchmarks.bench_tse --no-adapter                             # the untrained base, same settings

Prints a table; the result (without per-item records) is JSON on the last line; `--out FILE` writes the
whole result including every item (question, answer, plan text, per-step answers).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------- problem set

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kemal", "Lena",
         "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor")  # fmt: skip
OBJECTS = ("apples", "books", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards", "coins",
           "eggs", "balloons")  # fmt: skip
CONTAINERS = ("box", "bag", "basket", "jar", "packet", "crate")
UNIT_ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
              ("toy car", "toy cars"), ("plant", "plants"))  # fmt: skip


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    op: str  # "+", "-", "*"
    a: int
    b: int


def make_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` one-step word problems (+ and - with operands 2..50, small x with factors 2..9), deterministic by seed.

    Each problem states its numbers once, so the only numbers in a correct answer are the operands and the result.
    """
    rng = random.Random(f"bench_tse:{seed}")
    out: list[Problem] = []
    for _ in range(n):
        op = rng.choice("+-*")
        name = rng.choice(NAMES)
        if op == "+":
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            obj = rng.choice(OBJECTS)
            q = rng.choice(
                (
                    f"{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?",
                    f"There are {a} {obj} on a table. {name} puts {b} more {obj} on it. How many {obj} are on "
                    f"the table now?",
                )
            )
            ans = a + b
        elif op == "-":
            a, b = rng.randint(3, 50), rng.randint(2, 50)
            a, b = max(a, b), min(a, b)
            if a == b:
                a += 1
            obj = rng.choice(OBJECTS)
            q = rng.choice(
                (
                    f"{name} has {a} {obj} and gives {b} of them to a friend. How many {obj} does {name} have left?",
                    f"A shop has {a} {obj}. It sells {b} of them. How many {obj} does the shop have left?",
                )
            )
            ans = a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            if rng.random() < 0.5:
                obj, box = rng.choice(OBJECTS), rng.choice(CONTAINERS)
                q = f"Each {box} holds {a} {obj}. How many {obj} are in {b} {box}{'es' if box.endswith('x') else 's'}?"
            else:
                one, many = rng.choice(UNIT_ITEMS)
                q = f"One {one} costs {a} dollars. How many dollars do {b} {many} cost?"
            ans = a * b
        out.append(Problem(q, ans, op, a, b))
    return out


# ----------------------------------------------------------------------------------------------- stats


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the positive class (higher score = more likely positive).

    Mann-Whitney U with mid-ranks: AUROC = P(score_pos > score_neg) + 1/2 P(tie). None (undefined) when either
    class is empty. O(n log n).
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores for {len(positive)} labels")
    n_pos = sum(1 for p in positive if p)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1  # 1-based mid-rank of the tie group
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (n-1) over the defined values; n = how many were defined."""
    v = [float(x) for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def bootstrap_ci(items: Sequence[Any], stat, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap CIs over resampled items. `stat(items)` returns {name: value or None}; per name,
    resamples where the value is None (undefined, e.g. an AUROC with one class empty) are skipped and counted."""
    rng = random.Random(seed)
    point = stat(items)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot if items else 0):
        v = stat([items[rng.randrange(len(items))] for _ in range(len(items))])
        for k in draws:
            if v.get(k) is not None:
                draws[k].append(float(v[k]))
    out = {}
    for k, vals in draws.items():
        if not vals:
            out[k] = {"value": point[k], "lo": None, "hi": None, "defined_resamples": 0}
            continue
        vals.sort()
        lo_i = int(math.floor((1 - level) / 2 * (len(vals) - 1)))
        hi_i = int(math.ceil((1 + level) / 2 * (len(vals) - 1)))
        out[k] = {"value": point[k], "lo": vals[lo_i], "hi": vals[hi_i], "defined_resamples": len(vals)}
    return out


# ------------------------------------------------------------------------------------------- planners


def tiny_planner(gen_length: int):
    """A Planner over a tiny random block-causal backbone with SmolLM2's real tokenizer (for --smoke)."""
    import torch
    from transformers import AutoTokenizer

    from planners.assets import smollm2_hf_dir
    from planners.model import BackboneConfig, DiffusionBackbone
    from planners.planner import Planner
    from planners.sampler import SamplerConfig

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))
    torch.manual_seed(0)
    c = BackboneConfig(
        arch="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, mask_token_id=16, eos_token_id=tok.eos_token_id, tie_word_embeddings=True, shift=True,
        attention="block_causal", block_size=8, learned_mask_embedding=True, max_position_embeddings=2048,
    )  # fmt: skip
    m = DiffusionBackbone(c)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cfg = SamplerConfig(gen_length=gen_length, steps=gen_length, block_length=8, record_trajectory=True)
    return Planner(m.eval(), tok, cfg, name="tiny-random")


def _pt_to_safetensors(pt: Path, tmp: Path) -> tuple[Path, str]:
    """A training file of `python -m planners.adapt` as safetensors + sidecar, with the backbone settings it trains
    with (block-causal 8, mask id 16, alpha = rank): `best_adapter.pt` (a bare adapter state dict) or
    `checkpoint.pt` (the resumable state: {"adapter", "optimizer", "state", "rng"}). Returns (path, note)."""
    import torch
    from safetensors.torch import save_file

    from planners.adapt.cli import LORA_TARGETS

    try:
        obj = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception:  # checkpoint.pt keeps Python RNG state: our own training file, trusted
        obj = torch.load(pt, map_location="cpu", weights_only=False)
    note = ""
    if isinstance(obj, dict) and "adapter" in obj:
        st = obj.get("state", {})
        note = f" (training step {st.get('step')}, {st.get('elapsed', 0) / 60:.1f} min trained)"
        obj = obj["adapter"]
    ranks = {int(v.shape[0]) for k, v in obj.items() if k.endswith("lora_a")}
    if len(ranks) != 1:
        raise ValueError(f"{pt}: cannot infer one LoRA rank (found {sorted(ranks)})")
    r = ranks.pop()
    dst = tmp / (pt.stem + ".safetensors")
    save_file({k: v.float().contiguous() for k, v in obj.items()}, str(dst))
    backbone = {"mask_token_id": 16, "attention": "block_causal", "block_size": 8, "learned_mask_embedding": True,
                "lora_rank": r, "lora_alpha": float(r), "lora_targets": list(LORA_TARGETS)}  # fmt: skip
    dst.with_suffix(".json").write_text(json.dumps({"backbone": backbone, "converted_from": str(pt)}))
    return dst, note


def load_planner(adapter: str | None, no_adapter: bool):
    """(planner, description). adapter None: the shipped one; .pt: a training checkpoint; no_adapter: the base."""
    from planners.assets import DEFAULT_ADAPTER
    from planners.planner import Planner

    if no_adapter:
        # a path that does not exist makes Planner.load fall back to the untrained base (block-causal 8, mask id 16,
        # mask embedding = mean embedding): exactly the model training starts from
        missing = Path(tempfile.gettempdir()) / "bench_tse-no-adapter" / "none.safetensors"
        return Planner.load(None, adapter=missing), "untrained base (no adapter)"
    path = Path(adapter) if adapter else DEFAULT_ADAPTER
    if not path.exists():
        raise SystemExit(f"adapter not found: {path} (train one, pass --adapter PATH, or use --no-adapter)")
    if path.suffix == ".pt":
        tmp = Path(tempfile.mkdtemp(prefix="bench_tse-"))
        st, note = _pt_to_safetensors(path, tmp)
        return Planner.load(None, adapter=st), f"training checkpoint {path}{note}"
    return Planner.load(None, adapter=path), f"adapter {path}"


# ------------------------------------------------------------------------------------------------ run


def run_item(planner, prob: Problem, *, prompt: str, sampler: dict, tse_cfg, seed: int) -> dict:
    from planners.tse import extract_last_number, get_extractor, score_trajectory

    res = planner.plan(prompt, seed=seed, **sampler)
    score = score_trajectory(res.trajectory, planner.decode, tse_cfg)
    truth = str(prob.answer)
    final = extract_last_number(res.text)
    extract = get_extractor(tse_cfg.extractor)
    skip = score.detail.n_skipped
    step_answers = [extract(planner.decode(s.x0_hat)) for s in res.trajectory.steps]
    return {
        "question": prob.question,
        "op": prob.op,
        "answer": truth,
        "text": res.text,
        "final": final,
        "final_correct": final == truth,
        "vote": score.vote,
        "vote_correct": score.vote == truth,
        "vote_share": score.vote_share,
        "oracle_correct": truth in step_answers[skip:],
        "mentioned": mentions(res.text, truth),
        "tse": score.tse,
        "flip_rate": score.flip_rate,
        "mean_entropy": score.mean_entropy,
        "n_clusters": score.n_clusters,
        "n_used": score.n_used,
        "n_steps": score.n_steps,
        "all_unparseable": score.detail.all_unparseable,
        "step_answers": step_answers,
        "seed": seed,
        "nfe": res.stats["nfe"],
        "seconds": res.stats["seconds"],
    }


SIGNALS = ("tse", "flip_rate", "mean_entropy")
_INT_RE = re.compile(r"\d+(?:\.\d+)?")


def mentions(text: str, answer: str) -> bool:
    """The answer appears as a number anywhere in the text (not only last): a looser check than final accuracy."""
    return answer in _INT_RE.findall(text.replace(",", ""))


def ar_reference(planner, problems: list[list[Problem]], *, suffix: str, gen_length: int, threads: int) -> dict:
    """The AR model the planner was adapted from (SmolLM2-135M-Instruct, the packaged Q4_1 GGUF through llama-cpp),
    greedy, the same prompts and the same token budget: how often the teacher itself gets there."""
    import llama_cpp

    from planners.assets import smollm2_gguf_path
    from planners.tse import extract_last_number

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=512, n_threads=threads, verbose=False)
    stop = set(planner.model.config.stop_ids)
    per_seed, t0 = [], time.perf_counter()
    for probs in problems:
        final = mentioned = 0
        for prob in probs:
            toks: list[int] = []
            for t in llm.generate(planner.encode(prob.question + suffix), temp=0.0, top_k=1, repeat_penalty=1.0,
                                  reset=True):  # fmt: skip
                if t in stop or len(toks) >= gen_length:
                    break
                toks.append(t)
            text = planner.decode(toks)
            final += extract_last_number(text) == str(prob.answer)
            mentioned += mentions(text, str(prob.answer))
        per_seed.append({"final_acc": final / len(probs), "mentioned": mentioned / len(probs)})
    return {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llama-cpp), greedy",
        "per_seed": per_seed,
        "final_acc": mean_std([r["final_acc"] for r in per_seed]),
        "mentioned": mean_std([r["mentioned"] for r in per_seed]),
        "seconds": time.perf_counter() - t0,
    }


def summarise(items: list[dict]) -> dict[str, Any]:
    """Accuracies, AUROCs (signal -> wrong final answer) and signal means over one group of items."""
    n = len(items)
    wrong = [not it["final_correct"] for it in items]
    out: dict[str, Any] = {
        "n": n,
        "final_acc": sum(it["final_correct"] for it in items) / n if n else None,
        "vote_acc": sum(it["vote_correct"] for it in items) / n if n else None,
        "oracle_acc": sum(it["oracle_correct"] for it in items) / n if n else None,
        "mentioned": sum(it["mentioned"] for it in items) / n if n else None,
        "parsed": sum(it["final"] is not None for it in items) / n if n else None,
        "n_wrong": sum(wrong),
    }
    for sig in SIGNALS:
        pairs = [(it[sig], w) for it, w in zip(items, wrong, strict=True) if it[sig] is not None]
        out[f"auroc_{sig}"] = auroc([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        out[f"mean_{sig}"] = statistics.fmean(p[0] for p in pairs) if pairs else None
    # the same, only over items whose plan ends in a number: "nothing parsed" gives a high TSE (singleton
    # clusters) and is always wrong, which alone can push the AUROC up; this asks whether TSE tells right
    # numbers from wrong ones
    parsed = [it for it in items if it["final"] is not None]
    out["auroc_tse_parsed"] = auroc([it["tse"] for it in parsed], [not it["final_correct"] for it in parsed])
    right_tse = [it["tse"] for it in items if it["final_correct"]]
    wrong_tse = [it["tse"] for it in items if not it["final_correct"]]
    out["tse_when_right"] = statistics.fmean(right_tse) if right_tse else None
    out["tse_when_wrong"] = statistics.fmean(wrong_tse) if wrong_tse else None
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "undef"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _pm(d: dict, nd: int = 3) -> str:
    if d["mean"] is None:
        return "undef"
    s = f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f}"
    return s if d["n"] == d.get("of", d["n"]) else f"{s} ({d['n']}/{d['of']} seeds defined)"


def _ci(d: dict, nd: int = 3) -> str:
    if d["value"] is None:
        return "undef"
    if d["lo"] is None:
        return f"{d['value']:.{nd}f}"
    return f"{d['value']:.{nd}f} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"


COLUMNS = ("final_acc", "vote_acc", "oracle_acc", "mentioned", "parsed", "auroc_tse", "auroc_tse_parsed",
           "auroc_flip_rate", "auroc_mean_entropy", "mean_tse", "mean_flip_rate", "mean_mean_entropy")  # fmt: skip
HEADERS = ("final acc", "vote acc", "oracle", "mentioned", "parsed", "AUROC TSE", "AUROC TSE parsed", "AUROC flip",
           "AUROC ent", "TSE bits", "flip rate", "entropy")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=40, help="problems per seed")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..k-1 (problem set and sampling noise)")
    p.add_argument("--same-problems", action="store_true", help="one problem set (seed 0) for every seed")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length, 1 token per step)")
    p.add_argument("--gen-length", type=int, default=32, help="tokens the planner writes (a multiple of 8)")
    p.add_argument("--block-length", type=int, default=8, help="block length (8 for the embedded planner)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0: greedy; > 0 adds sampling noise per seed)")  # fmt: skip
    p.add_argument("--commit", default="static", choices=["static", "threshold"])
    p.add_argument("--threshold", type=float, default=0.9, help="commit=threshold: tau")
    p.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                   help="none: x0-hat covers the whole span every step (future blocks predicted too); prefix: "
                        "faster, future blocks stay masked in x0-hat")  # fmt: skip
    p.add_argument("--skip-ratio", type=float, default=0.5)
    p.add_argument("--weighting", default="exp", choices=["exp", "linear", "uniform"])
    p.add_argument("--alpha", type=float, default=5.0)
    p.add_argument("--suffix", default="", help="text appended to every question (default: none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--adapter",
        default=None,
        help="adapter .safetensors, or a training best_adapter.pt / checkpoint.pt (default: the shipped one)",
    )
    g.add_argument("--no-adapter", action="store_true", help="the untrained base model as planner")
    g.add_argument("--smoke", action="store_true", help="tiny random model, 4 problems x 2 seeds (a quick check)")
    p.add_argument("--ar-reference", action="store_true",
                   help="also run the AR model (llama-cpp, greedy) on the same prompts and token budget")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the pooled CIs")
    p.add_argument("--out", default=None, help="write the whole result (with items) as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch
    from tqdm import tqdm

    from planners.tse import TSEConfig

    torch.set_num_threads(a.threads)
    if a.smoke:
        a.n, a.seeds, a.gen_length = min(a.n, 4), min(a.seeds, 2), 16
        a.steps = a.steps or 16
    steps = a.steps or a.gen_length
    if a.temperature <= 0 and a.seeds > 1 and a.same_problems:
        raise SystemExit("--same-problems with temperature 0: every seed would give the same result")

    t_load = time.perf_counter()
    if a.smoke:
        planner, desc = tiny_planner(a.gen_length), "tiny random model (smoke)"
    else:
        planner, desc = load_planner(a.adapter, a.no_adapter)
    load_s = time.perf_counter() - t_load
    sampler = dict(gen_length=a.gen_length, steps=steps, block_length=a.block_length, temperature=a.temperature,
                   commit=a.commit, threshold=a.threshold, cache=a.cache, record_trajectory=True)  # fmt: skip
    tse_cfg = TSEConfig(skip_ratio=a.skip_ratio, weighting=a.weighting, alpha=a.alpha, extractor="last_number",
                        clusterer="exact")  # fmt: skip

    items: list[dict] = []
    per_seed: list[dict] = []
    bar = tqdm(total=a.n * a.seeds, desc="bench_tse", disable=a.no_progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    problem_sets = [make_problems(a.n, 0 if a.same_problems else s) for s in range(a.seeds)]
    for s, probs in enumerate(problem_sets):
        t_seed = time.perf_counter()
        group = []
        for i, prob in enumerate(probs):
            it = run_item(planner, prob, prompt=prob.question + a.suffix, sampler=sampler, tse_cfg=tse_cfg,
                          seed=s * 100_003 + i)  # fmt: skip
            it["run_seed"], it["index"] = s, i
            group.append(it)
            bar.update(1)
            bar.set_postfix(acc=f"{sum(x['final_correct'] for x in group)}/{len(group)}")
        per_seed.append({"seed": s, **summarise(group), "seconds": time.perf_counter() - t_seed})
        items += group
    bar.close()
    wall = time.perf_counter() - t0

    keys = (
        ("final_acc", "vote_acc", "oracle_acc", "mentioned", "parsed", "auroc_tse_parsed")
        + tuple(f"auroc_{x}" for x in SIGNALS)
        + tuple(f"mean_{x}" for x in SIGNALS)
    )
    over_seeds = {k: {**mean_std([r[k] for r in per_seed]), "of": len(per_seed)} for k in keys}
    pooled = summarise(items)
    boot_keys = ("final_acc", "vote_acc", "oracle_acc", "auroc_tse", "auroc_tse_parsed", "auroc_flip_rate",
                 "auroc_mean_entropy")  # fmt: skip

    def stat(xs: list[dict]) -> dict:
        s = summarise(xs)
        return {k: s[k] for k in boot_keys}

    boot = bootstrap_ci(items, stat, n_boot=a.bootstrap, seed=1)
    ar = None
    if a.ar_reference and not a.smoke:
        ar = ar_reference(planner, problem_sets, suffix=a.suffix, gen_length=a.gen_length, threads=a.threads)
    result = {
        "bench": "tse",
        "planner": planner.name,
        "planner_source": desc,
        "settings": {
            "n": a.n,
            "seeds": a.seeds,
            "same_problems": a.same_problems,
            "prompt_suffix": a.suffix,
            **sampler,
            "tse": tse_cfg.to_dict(),
            "threads": a.threads,
            "bootstrap": a.bootstrap,
        },  # fmt: skip
        "per_seed": per_seed,
        "over_seeds": over_seeds,
        "pooled": pooled,
        "pooled_bootstrap_95": boot,
        "seconds": {"load": load_s, "run": wall, "per_item": wall / max(len(items), 1)},
        "nfe_per_item": statistics.fmean(it["nfe"] for it in items) if items else None,
        "ar_reference": ar,
    }

    print(f"planner: {planner.name} — {desc}")
    print(
        f"{a.n} problems x {a.seeds} seeds, gen {a.gen_length}, steps {steps}, blocks of {a.block_length}, "
        f"T={a.temperature}, commit {a.commit}, cache {a.cache}; TSE: last_number / exact, skip {a.skip_ratio}, "
        f"{a.weighting} alpha {a.alpha}; {wall:.0f} s"
    )
    print("| seed | " + " | ".join(HEADERS) + " |")
    print("| ---: | " + " | ".join("---:" for _ in HEADERS) + " |")
    for r in per_seed:
        print(f"| {r['seed']} | " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    print("| mean ± std | " + " | ".join(_pm(over_seeds[c]) for c in COLUMNS) + " |")
    print("| pooled | " + " | ".join(_fmt(pooled[c]) for c in COLUMNS) + " |")
    print(
        "pooled bootstrap 95% CI: "
        + "; ".join(f"{k} {_ci(v)}" for k, v in boot.items())
        + f"; wrong answers {pooled['n_wrong']}/{pooled['n']}; mean TSE right {_fmt(pooled['tse_when_right'])} / "
        f"wrong {_fmt(pooled['tse_when_wrong'])} bits"
    )
    if ar is not None:
        print(
            f"AR reference ({ar['model']}, {a.gen_length} tokens): final acc {_pm(ar['final_acc'])}, "
            f"answer mentioned {_pm(ar['mentioned'])}"
        )
    if pooled["auroc_tse"] is None:
        print("AUROC undefined: every final answer is " + ("wrong" if pooled["n_wrong"] == pooled["n"] else "right"))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**result, "items": items}, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
