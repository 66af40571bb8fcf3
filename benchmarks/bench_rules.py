"""Decoding rules: speed, plan quality and task accuracy of every commit rule of the sampler, on the shipped planner.

The embedded planner is loaded as the product loads it (`hybrid.runtime.build_planner(HybridConfig.load())`:
engine auto = llama.cpp q8_0 on a CPU) and every rule runs on top of the product's planner settings
(`hybrid.config.PlannerSettings`: 48-token plans, blocks of 8, prefix cache, greedy, trajectory recorded) with only
its own overrides (the `RULES` table: name -> `SamplerConfig` overrides). The baseline is static commits with
steps = gen_length (exactly one token per pass), measured in the same run.

Per rule:
  - plans, on the planner's held-out free-text prompts (`planners.adapt.data.make_prompts`, topics never seen in
    training; the prompts of `bench_plan_vs_ar.py`): NFE, tokens per pass (tokens the passes committed / NFE:
    EOS filled in by the early stop is not counted), wall time per plan and its ratio to the baseline; quality as
    `bench_planner_quality.py` defines it: the untouched AR model's NLL per plan token (adapter off, causal),
    repeated bigrams, and (unless --no-cosine) MiniLM cosine to the AR model's own greedy plan;
  - answers in diffusion mode (the planner writes the answer itself: `hybrid.runtime.sampler_config(cfg,
    "diffusion")`, `hybrid.prompts.answer_messages`) on a topic-stratified subsample of the factual task set
    (`hybrid.tasks.factual_tasks`, `subsample`, as `bench_tse.py`), checked by `hybrid.compare.check_answer`:
    accuracy, and the paired difference to the product default with its discordant pairs.
The rules alternate per prompt / task (the order rotated), so a neighbour's load falls on every rule alike; the
1-minute load average is recorded before and after each phase.

    python -m benchmarks.bench_rules                         # every rule, 20 prompts, 40 tasks (~1.5 h on 2 cores)
    python -m benchmarks.bench_rules --rules static-1 learned-0.95 factor-1 --prompts 8 --tasks 20
    python -m benchmarks.bench_rules --smoke                 # 2 prompts, 2 tasks, 3 rules, short spans

Prints a table; the whole result is JSON on the last line (`--out FILE` also writes it, with the per-item records).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

# name -> SamplerConfig overrides on top of the product's planner settings. "per_pass": a counted rule's tokens per
# pass (steps = gen_length / per_pass, for the plan's and the answer's span alike); dynamic rules keep steps =
# gen_length (a block's step budget = its length: the last allowed step commits what is left).
RULES: dict[str, dict[str, Any]] = {
    "static-1": {"commit": "static", "per_pass": 1},  # the baseline: one token per pass
    "static-2": {"commit": "static", "per_pass": 2},
    "dilated-2": {"commit": "dilated", "per_pass": 2},  # DUS: bit-reversed order, 2 per pass
    "threshold-0.9": {"commit": "threshold", "threshold": 0.9},  # Fast-dLLM, arXiv 2505.22618
    "threshold-0.7": {"commit": "threshold", "threshold": 0.7},
    "entropy-0.5": {"commit": "threshold", "confidence": "entropy", "threshold": 0.5},  # nats
    "entropy-1.0": {"commit": "threshold", "confidence": "entropy", "threshold": 1.0},
    "factor-0.5": {"commit": "factor", "factor": 0.5},  # Fast-dLLM's factor rule
    "factor-1": {"commit": "factor", "factor": 1.0},
    "factor-2": {"commit": "factor", "factor": 2.0},
    "eb-0.1": {"commit": "entropy_bounded", "eb_gamma": 0.1},  # EB-sampler, arXiv 2505.24857
    "eb-0.5": {"commit": "entropy_bounded", "eb_gamma": 0.5},
    "learned-0.95": {"commit": "learned", "threshold": 0.95},  # the product default (Learn2PD, arXiv 2509.25188)
    "learned-0.9": {"commit": "learned", "threshold": 0.9},
    "learned-0.95-inside": {"commit": "learned", "threshold": 0.95, "eos_early_stop": "inside"},
    "credit+threshold-0.9": {"commit": "threshold", "threshold": 0.9, "boost": "credit"},  # dInfer, arXiv 2510.08666
    "credit+learned-0.95": {"commit": "learned", "threshold": 0.95, "boost": "credit"},
    "adaptive+threshold-0.9": {"commit": "threshold", "threshold": 0.9, "blocks": "adaptive"},  # arXiv 2509.26432
    "adaptive+learned-0.95": {"commit": "learned", "threshold": 0.95, "blocks": "adaptive"},
}
BASELINE = "static-1"
DEFAULT = "learned-0.95"  # hybrid/config.py PlannerSettings
SMOKE_RULES = ["static-1", "threshold-0.9", "learned-0.95"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="*", default=None, help=f"subset of the table (default: all): {', '.join(RULES)}")
    p.add_argument("--prompts", type=int, default=20, help="held-out free-text prompts (plans: speed, quality)")
    p.add_argument("--tasks", type=int, default=40, help="factual tasks, topic-stratified (diffusion accuracy)")
    p.add_argument("--answer-length", type=int, default=48, help="diffusion mode's answer span (as bench_tse.py)")
    p.add_argument("--no-cosine", action="store_true", help="skip the AR reference plans and the MiniLM cosine")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the planner's engine: product default)")
    p.add_argument("--seed", type=int, default=0, help="prompt split and task subsample seed")
    p.add_argument("--smoke", action="store_true", help="2 prompts, 2 tasks, 3 rules, 16-token spans")
    p.add_argument("--out", default=None, help="also write the JSON, with per-item records, here")
    return p.parse_args(argv)


def rule_config(base, overrides: dict[str, Any]):
    """`base` (a product SamplerConfig, plan or answer span) with one rule's overrides."""
    o = dict(overrides)
    per_pass = o.pop("per_pass", None)
    steps = base.gen_length // per_pass if per_pass else base.gen_length
    return dataclasses.replace(base, steps=steps, **o)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _rotated(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def run_one(planner, messages, cfg) -> dict[str, Any]:
    r = planner.plan(messages, config=cfg)
    nfe = int(r.stats["nfe"])
    return {"tokens": r.tokens, "text": r.text, "prompt_ids": r.prompt_ids, "nfe": nfe,
            "committed": int(r.stats["committed"]), "seconds": r.stats["seconds"]}  # fmt: skip


def summarize(rules: list[str], plans: dict, answers: dict, tasks, prompt_ids, scorer, embed, refs) -> list[dict]:
    from benchmarks.bench_planner_quality import _mean, ar_nll, repeat_rate

    rows = []
    base_secs = plans[BASELINE] if BASELINE in plans else None
    ref_emb = embed(refs) if embed is not None else None
    ref_default = answers.get(DEFAULT)
    n_tasks = len(tasks)
    for name in rules:
        ps, ans = plans[name], answers[name]
        row: dict[str, Any] = {"rule": name, "overrides": RULES[name]}
        if "error" in ps:
            rows.append({**row, "error": ps["error"]})
            continue
        secs = [p["seconds"] for p in ps["items"]]
        nfe = [p["nfe"] for p in ps["items"]]
        toks = [p["tokens"] for p in ps["items"]]
        row.update(
            nfe=round(statistics.mean(nfe), 1),
            tokens_per_pass=round(sum(p["committed"] for p in ps["items"]) / sum(nfe), 3),
            ms_per_plan=round(1000 * statistics.mean(secs), 1),
            ms_per_pass=round(1000 * sum(secs) / sum(nfe), 1),
            ar_nll=round(_mean([ar_nll(scorer, i, t) for i, t in zip(prompt_ids, toks, strict=True)]), 3),
            repeat_rate=round(statistics.mean(map(repeat_rate, toks)), 3),
            mean_len=round(statistics.mean(map(len, toks)), 1),
        )
        if base_secs is not None and "items" in base_secs:
            b = [p["seconds"] for p in base_secs["items"]]
            row["x_baseline_speed"] = round(sum(b) / sum(secs), 2)  # > 1: faster than one token per pass
            row["x_baseline_speed_median"] = round(statistics.median(x / y for x, y in zip(b, secs, strict=True)), 2)
        if ref_emb is not None:
            cos = [float(x @ y) for x, y in zip(embed([p["text"] for p in ps["items"]]), ref_emb, strict=True)]
            row["cosine_vs_ar"] = round(statistics.mean(cos), 3)
        if "error" in ans:
            row["answer_error"] = ans["error"]
        elif n_tasks:
            ok = [it["correct"] for it in ans["items"]]
            acc = sum(ok) / n_tasks
            a_nfe = sum(it["nfe"] for it in ans["items"])
            row.update(
                accuracy=round(acc, 3),
                correct=f"{sum(ok)}/{n_tasks}",
                accuracy_se=round(math.sqrt(acc * (1 - acc) / n_tasks), 3),
                answer_nfe=round(a_nfe / n_tasks, 1),
                answer_tokens_per_pass=round(sum(it["committed"] for it in ans["items"]) / a_nfe, 3),
                ms_per_answer=round(1000 * statistics.mean(it["seconds"] for it in ans["items"]), 1),
            )
            if ref_default is not None and "items" in ref_default:
                d = [it["correct"] for it in ref_default["items"]]
                gain = sum(x and not y for x, y in zip(ok, d, strict=True))
                loss = sum(y and not x for x, y in zip(ok, d, strict=True))
                # paired: the difference to the default and its standard error from the discordant pairs
                row["vs_default"] = {"delta": round((gain - loss) / n_tasks, 3), "gained": gain, "lost": loss,
                                     "se": round(math.sqrt(gain + loss) / n_tasks, 3)}  # fmt: skip
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from benchmarks.bench_plan_vs_ar import _cpu
    from benchmarks.bench_planner_quality import ar_plans, pick_prompts
    from hybrid import prompts as hp
    from hybrid.compare import check_answer
    from hybrid.config import HybridConfig
    from hybrid.runtime import build_planner, sampler_config
    from hybrid.tasks import factual_tasks, subsample
    from planners.assets import DEFAULT_ADAPTER, smollm2_hf_dir
    from planners.loading import load_backbone

    rules = a.rules or (SMOKE_RULES if a.smoke else list(RULES))
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}; known: {list(RULES)}")
    if BASELINE not in rules:
        rules = [BASELINE, *rules]  # the baseline is always measured, in the same run
    n_prompts, n_tasks = (2, 2) if a.smoke else (a.prompts, a.tasks)
    over: dict[str, Any] = {"planner.answer_length": a.answer_length}
    if a.smoke:
        over.update({"planner.gen_length": 16, "planner.answer_length": 16, "planner.steps": 16})
    hc = HybridConfig.load(**over)
    load0 = _load()
    t_load = time.perf_counter()
    planner = build_planner(hc)
    load_s = time.perf_counter() - t_load
    base = {"plan": sampler_config(hc, "hybrid"), "answer": sampler_config(hc, "diffusion")}
    cfgs: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict] = {}
    answers: dict[str, dict] = {}
    for name in rules:  # a rule the sampler rejects is recorded and skipped
        try:
            cfgs[name] = {k: planner.resolve(rule_config(b, RULES[name])) for k, b in base.items()}
            plans[name], answers[name] = {"items": []}, {"items": []}
        except (ValueError, TypeError) as e:
            plans[name] = answers[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {plans[name]['error']}", flush=True)
    live = [r for r in rules if r in cfgs]
    prompts = pick_prompts(n_prompts, 0, a.seed)
    tasks = subsample(factual_tasks(), n_tasks, a.seed)
    for name in live:  # warm-up, untimed: one short answer per rule (engine buffers, policy weights)
        try:
            run_one(planner, hp.answer_messages("Say hello."), cfgs[name]["answer"])
        except Exception as e:  # noqa: BLE001 - a rule that fails is reported, the others still run
            plans[name] = answers[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: {plans[name]['error']}", flush=True)
    live = [r for r in live if "items" in plans[r]]

    # ---- plans: speed and quality, rules rotated per prompt
    loads: dict[str, list[float]] = {"plans": [_load()]}
    t0 = time.perf_counter()
    prompt_ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        for name in _rotated(live, i):
            r = run_one(planner, hp.plan_messages(p.text), cfgs[name]["plan"])
            plans[name]["items"].append({k: r[k] for k in ("tokens", "text", "nfe", "committed", "seconds")})
            if name == BASELINE:
                prompt_ids.append(r["prompt_ids"])
        print(f"  prompt {i + 1}/{len(prompts)}  load {_load()}", flush=True)
    plans_s = time.perf_counter() - t0
    loads["plans"].append(_load())

    # ---- answers in diffusion mode: accuracy, rules rotated per task
    loads["tasks"] = [_load()]
    t0 = time.perf_counter()
    for i, t in enumerate(tasks):
        for name in _rotated(live, i):
            r = run_one(planner, hp.answer_messages(t.question), cfgs[name]["answer"])
            ok = bool(check_answer(t, r["text"]))
            answers[name]["items"].append({"id": t.id, "text": r["text"], "correct": ok, "nfe": r["nfe"],
                                           "committed": r["committed"], "seconds": r["seconds"]})  # fmt: skip
        print(f"  task {i + 1}/{len(tasks)}  load {_load()}", flush=True)
    tasks_s = time.perf_counter() - t0
    loads["tasks"].append(_load())

    # ---- quality (untimed): the untouched AR model scores the plans; MiniLM against the AR model's own plans
    t0 = time.perf_counter()
    scorer = load_backbone(smollm2_hf_dir(), adapter=DEFAULT_ADAPTER, mask_token_id=16)
    embed = refs = None
    if not a.no_cosine:
        from planners.embedding import SentenceEmbedder

        eos = planner.tokenizer.eos_token_id
        ref_ids, _ = ar_plans(prompt_ids, base["plan"].gen_length, eos, a.threads)
        refs = [planner.tokenizer.decode(r, skip_special_tokens=True) for r in ref_ids]
        embed = SentenceEmbedder()
    rows = summarize(rules, plans, answers, tasks, prompt_ids, scorer, embed, refs)
    score_s = time.perf_counter() - t0

    result: dict[str, Any] = {
        "planner": planner.name,
        "cpu": _cpu(),
        "threads": a.threads,
        "prompts": len(prompts),
        "tasks": len(tasks),
        "gen_length": base["plan"].gen_length,
        "answer_length": base["answer"].gen_length,
        "baseline": BASELINE,
        "default": DEFAULT,
        "product_sampler": {k: v for k, v in base["plan"].to_dict().items() if k != "delimiter_ids"},
        "loadavg_1m_before_after": {"run": [load0, _load()], **loads},
        "seconds": {
            "load": round(load_s, 1),
            "plans": round(plans_s, 1),
            "tasks": round(tasks_s, 1),
            "scoring": round(score_s, 1),
        },  # fmt: skip
        "rows": rows,
    }
    cols = ["rule", "tokens_per_pass", "nfe", "ms_per_plan", "x_baseline_speed", "ar_nll", "repeat_rate",
            "cosine_vs_ar", "mean_len", "accuracy", "answer_tokens_per_pass", "ms_per_answer"]  # fmt: skip
    print(f"\n{len(prompts)} held-out prompts ({result['gen_length']}-token plans), {len(tasks)} tasks "
          f"({result['answer_length']}-token answers), {planner.name}, {result['cpu']}, "
          f"load {result['loadavg_1m_before_after']}")  # fmt: skip
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, r.get("error", "–") if c == "tokens_per_pass" else "–")) for c in cols))
    if a.out:
        full = {**result, "plans": plans, "answers": answers}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(full, default=str))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
