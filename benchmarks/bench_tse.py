"""Is the score a signal? TSE and its baselines against wrong answers, on a checkable factual task set.

On `hybrid.tasks.factual_tasks()` (short factual questions, ~330, held out by topic from the planner's adaptation
data; `--n` draws a topic-stratified subsample), with the models loaded once, greedy decoding and the
product's own settings (`HybridConfig` defaults, one `SamplerConfig` per mode from `hybrid.runtime.sampler_config`):

Phase 1, per task, every mode:
  - ar: the realizer answers alone;
  - diffusion: the planner writes the answer itself (its trajectory recorded and scored);
  - hybrid: the planner drafts a plan (trajectory scored), the realizer answers following it.
  Signals per draft (all oriented higher = less trustworthy): TSE with the embedding clusterer (the product's
  default scorer) and with the exact clusterer, mean token entropy, 1 - final-step confidence (`low_confidence`),
  flip rate, 1 - vote share (`vote_dissent`); and the degeneracy check (`planners.tse.degeneracy`).
  AUROC of each signal for a wrong answer (Mann-Whitney U, ties as 1/2), percentile-bootstrap 95% CIs, for the
  diffusion answers and for the hybrid answers (signal of the plan, correctness of the realized answer);
  accuracy of the temporal self-consistency vote against the final text (diffusion).

Phase 2, per task, with the gate's signal (`--signal`, default low_confidence, fixed before the run): the revise loop
(`planners.revise.revise`, the graph's policy) runs its whole budget on the hybrid plan, scoring every attempt
on the full span; each attempt's best plan is realized. Because an attempt does not depend on the acceptance
threshold, every threshold's outcome follows from this one run: hybrid mode hands over the first draft whose
value is at or under the threshold (and not degenerate) and otherwise answers unplanned (AR alone), exactly as
the graph does. The threshold with the best hybrid accuracy after revision is reported (and its two-fold
cross-validated accuracy, calibrated on one half, scored on the other). Revision is compared with spending
the same forward passes on one single draft at a higher commit threshold (`--tau-alt`).

    python -m benchmarks.bench_tse --smoke                 # tiny random planner, seconds
    python -m benchmarks.bench_tse --n 120 --out r.json    # the shipped planner on 120 tasks

Prints tables; the result (without per-item records) is JSON on the last line; `--out FILE` writes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------------- models


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


SIGNALS = ("tse", "tse_exact", "mean_entropy", "low_confidence", "flip_rate", "vote_dissent")


class Scorer:
    """Every signal of one trajectory: the product's scorer (`hybrid.nodes.score_summary`'s ingredients) plus
    TSE with the exact clusterer."""

    def __init__(self, planner, tse_cfg, embed):
        self.planner, self.cfg, self.embed = planner, tse_cfg, embed
        self.exact_cfg = dataclasses.replace(tse_cfg, clusterer="exact")
        self.stop_ids = list(planner.model.config.stop_ids)

    def __call__(self, traj) -> dict[str, Any]:
        from planners.tse import degeneracy, score_trajectory

        s = score_trajectory(traj, self.planner.decode, self.cfg, embed=self.embed, stop_ids=self.stop_ids)
        e = score_trajectory(traj, self.planner.decode, self.exact_cfg, stop_ids=self.stop_ids)
        end = next((i for i, t in enumerate(traj.final) if t in set(self.stop_ids)), traj.gen_length)
        sig = {**s.signals(), "tse_exact": e.tse}
        return {
            "signals": sig,
            "degenerate": degeneracy(self.planner.decode(traj.final[:end])),
            "vote": s.vote,
            "vote_share": s.vote_share,
            "n_steps": s.n_steps,
        }


def rank_of(sc: dict[str, Any], signal: str) -> float:
    """What a draft is accepted and compared on (as the graph): the signal, +inf if undefined or degenerate."""
    v = sc["signals"].get(signal)
    return math.inf if (v is None or sc["degenerate"] or math.isnan(v)) else float(v)


# ------------------------------------------------------------------------------------------------ run


def _realize(realizer, params, question: str, plan: str | None) -> dict[str, Any]:
    from hybrid import prompts
    from realizers.base import acomplete

    t0 = time.perf_counter()
    c = asyncio.run(acomplete(realizer, prompts.realizer_messages(question, plan), params))
    return {"text": c.text.strip(), "ttft_s": c.timings.ttft_s, "seconds": time.perf_counter() - t0,
            "tokens": c.usage.completion_tokens}  # fmt: skip


def phase1(task, *, planner, realizer, params, samplers, scorer) -> dict[str, Any]:
    from hybrid import prompts
    from hybrid.compare import check_answer

    it: dict[str, Any] = {"id": task.id, "kind": task.kind, "question": task.question, "answer": task.answer}
    ar = _realize(realizer, params, task.question, None)
    it["ar"] = {**ar, "correct": bool(check_answer(task, ar["text"]))}
    t0 = time.perf_counter()
    d = planner.plan(prompts.answer_messages(task.question), config=samplers["diffusion"])
    sc = scorer(d.trajectory)
    it["diffusion"] = {
        "text": d.text, "correct": bool(check_answer(task, d.text)), "nfe": d.stats["nfe"],
        "seconds": time.perf_counter() - t0, **sc, "vote_correct": bool(check_answer(task, sc["vote"] or "")),
    }  # fmt: skip
    t0 = time.perf_counter()
    same = prompts.plan_messages(task.question) == prompts.answer_messages(task.question)
    if same and samplers["hybrid"] == samplers["diffusion"]:
        p, plan_s = d, it["diffusion"]["seconds"]  # the same request, greedy: the same draft (not run twice)
    else:
        p = planner.plan(prompts.plan_messages(task.question), config=samplers["hybrid"])
        plan_s = time.perf_counter() - t0
        sc = scorer(p.trajectory)
    real = _realize(realizer, params, task.question, p.text)
    it["hybrid"] = {"plan": p.text, "nfe": p.stats["nfe"], "plan_seconds": plan_s, **sc, "realized": real,
                    "correct": bool(check_answer(task, real["text"]))}  # fmt: skip
    it["_plan"] = p
    return it


def phase2(task, it, *, planner, realizer, params, samplers, scorer, signal, max_attempts, revise_cfg, tau_alt):
    """The revise loop (`planners.revise.revise`, the graph's policy) on the hybrid plan with its whole budget
    (threshold -1: nothing is accepted, so every attempt runs), the best plan after each attempt realized; and
    one single draft at commit threshold `tau_alt` (the same-NFE alternative), realized."""
    from hybrid import prompts
    from hybrid.compare import check_answer
    from planners.planner import PlanResult
    from planners.revise import Draft, revise

    p: PlanResult = it.pop("_plan")
    base = samplers["hybrid"]
    cands: list[Draft] = []

    def redraw(masked: list[int], positions: list[int], seed: int) -> Draft:
        prev = PlanResult("", [], p.prompt_ids, None, {}, span=list(masked))
        cfg = dataclasses.replace(base, seed=seed, temperature=revise_cfg.temperature)
        r = planner.redraw(prev, positions, config=cfg)
        d = Draft(list(r.span), r.trajectory, info={"text": r.text})
        cands.append(d)
        return d

    def score(d: Draft) -> float:
        d.info["sc"] = scorer(d.trajectory)
        return rank_of(d.info["sc"], signal)

    first = Draft(list(p.span), p.trajectory, score=rank_of(it["hybrid"], signal), info={"text": p.text})
    res = revise(first, score=score, threshold=-1.0, max_attempts=max_attempts, redraw=redraw, mode="remask",
                 fraction=revise_cfg.fraction, rule=revise_cfg.rule, stop_ids=set(planner.model.config.stop_ids),
                 seed=base.seed)  # fmt: skip
    correct_of = {p.text: it["hybrid"]["correct"]}
    best_text, best_rank, nfe, log = p.text, first.score, 0, []
    for att, cand in zip(res.attempts, cands, strict=False):
        nfe += att.nfe
        text = cand.info["text"]
        if att.improved:
            best_text, best_rank = text, att.score
            if text not in correct_of:
                correct_of[text] = bool(check_answer(task, _realize(realizer, params, task.question, text)["text"]))
        log.append({"attempt": att.index, "positions": att.positions, "rank": _jf(att.score), "text": text,
                    "improved": att.improved, "degenerate": cand.info["sc"]["degenerate"],
                    "signals": cand.info["sc"]["signals"], "best_rank": _jf(best_rank),
                    "best_correct": correct_of[best_text], "nfe_total": nfe})  # fmt: skip
    it["hybrid"]["rank"] = _jf(first.score)
    it["hybrid"]["attempts"] = log
    alt = planner.plan(prompts.plan_messages(task.question), config=dataclasses.replace(base, threshold=tau_alt))
    asc = scorer(alt.trajectory)
    real = _realize(realizer, params, task.question, alt.text)
    it["alt"] = {"plan": alt.text, "nfe": alt.stats["nfe"], "rank": _jf(rank_of(asc, signal)),
                 "correct": bool(check_answer(task, real["text"]))}  # fmt: skip
    return it


def _jf(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ------------------------------------------------------------------------------------------- analysis


def _inf(x: float | None) -> float:
    return math.inf if x is None else float(x)


def auroc_rows(items: list[dict], mode: str, n_boot: int) -> dict[str, Any]:
    """AUROC (with bootstrap CI) of every signal, and of the degeneracy flag, for a wrong `mode` answer."""
    keys = [*SIGNALS, "degenerate"]

    def val(it: dict, k: str) -> float | None:
        m = it[mode]
        return float(bool(m["degenerate"])) if k == "degenerate" else m["signals"].get(k)

    def stat(xs: list[dict]) -> dict[str, float | None]:
        out = {}
        for k in keys:
            pairs = [(val(it, k), not it[mode]["correct"]) for it in xs if val(it, k) is not None]
            out[k] = auroc([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
        return out

    ci = bootstrap_ci(items, stat, n_boot=n_boot, seed=1)
    n_wrong = sum(not it[mode]["correct"] for it in items)
    return {"n": len(items), "n_right": len(items) - n_wrong, "n_wrong": n_wrong, "auroc": ci}


def simulate(items: list[dict], t: float, budget: int) -> dict[str, Any]:
    """Hybrid mode as the graph runs it, at acceptance threshold `t` with `budget` revisions: the first draft
    at or under `t` (initial, then the best after each attempt) is handed over; otherwise the realizer answers
    alone (unplanned)."""
    correct, trusted, nfe_rev = [], [], []
    for it in items:
        h = it["hybrid"]
        ok, tr, spent = it["ar"]["correct"], False, 0
        if _inf(h["rank"]) <= t:
            ok, tr = h["correct"], True
        else:
            for a in h["attempts"][:budget]:
                spent = a["nfe_total"]
                if _inf(a["best_rank"]) <= t:
                    ok, tr = a["best_correct"], True
                    break
        correct.append(ok)
        trusted.append(tr)
        nfe_rev.append(spent)
    n = len(items)
    tr_items = [c for c, t_ in zip(correct, trusted, strict=True) if t_]
    ar_on_tr = [it["ar"]["correct"] for it, t_ in zip(items, trusted, strict=True) if t_]
    un = [c for c, t_ in zip(correct, trusted, strict=True) if not t_]
    return {
        "threshold": _jf(t) if math.isfinite(t) else ("inf" if t > 0 else "-inf"),
        "budget": budget,
        "accuracy": sum(correct) / n if n else None,
        "trusted": len(tr_items),
        "accuracy_trusted": sum(tr_items) / len(tr_items) if tr_items else None,
        "ar_accuracy_on_trusted": sum(ar_on_tr) / len(ar_on_tr) if ar_on_tr else None,
        "unplanned": len(un),
        "accuracy_unplanned": sum(un) / len(un) if un else None,
        "revision_nfe_mean": statistics.fmean(nfe_rev) if nfe_rev else 0.0,
    }


def candidate_thresholds(items: list[dict]) -> list[float]:
    vals = {_inf(it["hybrid"]["rank"]) for it in items}
    vals |= {_inf(a["best_rank"]) for it in items for a in it["hybrid"]["attempts"]}
    return [-math.inf, *sorted(v for v in vals if math.isfinite(v))]


def calibrate(items: list[dict], budget: int) -> float:
    """The threshold with the best hybrid accuracy after revision (ties: the largest, i.e. the most plans used)."""
    best_t, best_acc = -math.inf, -1.0
    for t in candidate_thresholds(items):
        acc = simulate(items, t, budget)["accuracy"] or 0.0
        if acc >= best_acc - 1e-12:
            best_t, best_acc = t, max(acc, best_acc)
    return best_t


def cross_validated(items: list[dict], budget: int, seed: int = 0) -> dict[str, Any]:
    """Two-fold: calibrate on one half, score the other half (both ways); the accuracy an unseen set would get."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    halves = [[items[i] for i in idx[::2]], [items[i] for i in idx[1::2]]]
    out = []
    for a, b in ((0, 1), (1, 0)):
        t = calibrate(halves[a], budget)
        out.append({"threshold": _jf(t) if math.isfinite(t) else str(t), **simulate(halves[b], t, budget)})
    n = sum(len(h) for h in halves)
    acc = sum(r["accuracy"] * len(halves[b]) for r, b in zip(out, (1, 0), strict=True)) / n if n else None
    return {"accuracy": acc, "folds": out}


def gate_by_signal(items: list[dict]) -> dict[str, Any]:
    """Hybrid mode gated by each signal in turn, without revision (the calibrated threshold and its accuracy)."""
    out = {}
    for sig in SIGNALS:
        xs = [{**it, "hybrid": {**it["hybrid"], "rank": _jf(rank_of(it["hybrid"], sig)), "attempts": []}}
              for it in items]  # fmt: skip
        t = calibrate(xs, 0)
        out[sig] = simulate(xs, t, 0)
    return out


def _acc(xs: Sequence[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="topic-stratified subsample of the task set (default: all)")
    p.add_argument("--seed", type=int, default=0, help="subsample seed")
    p.add_argument("--config", default=None, help="HybridConfig file (default: the product defaults)")
    p.add_argument("--max-tokens", type=int, default=64, help="realizer tokens per answer (short factual answers)")
    p.add_argument(
        "--signal",
        default="low_confidence",
        choices=SIGNALS,
        help="the signal the revise loop and the acceptance gate use (phase 2)",
    )
    p.add_argument("--answer-length", type=int, default=48, help="diffusion mode's answer tokens (short answers)")
    p.add_argument("--items", default=None, help="JSONL of per-task records: appended as tasks finish, resumed from")
    p.add_argument("--budget", type=int, default=None, help="revisions (default: config revise.max_revisions)")
    p.add_argument("--tau-alt", type=float, default=0.99, help="commit threshold of the same-NFE single draft")
    p.add_argument("--smoke", action="store_true", help="tiny random planner, 6 tasks (a quick check)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--no-run", action="store_true", help="only analyse the records already in --items")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch
    from tqdm import tqdm

    from hybrid.config import HybridConfig
    from hybrid.runtime import sampler_config
    from hybrid.tasks import factual_tasks, subsample
    from planners.embedding import default_embedder
    from planners.tse import TSEConfig
    from realizers.base import SamplingParams
    from realizers.embedded import embedded_realizer

    torch.set_num_threads(a.threads)
    over: dict[str, Any] = {"realizer.max_tokens": a.max_tokens, "planner.answer_length": a.answer_length}
    if a.smoke:
        over.update({"planner.gen_length": 16, "planner.answer_length": 16, "planner.steps": 16,
                     "realizer.max_tokens": 8})  # fmt: skip
    cfg = HybridConfig.load(a.config, **over)
    tasks = subsample(factual_tasks(), 6 if a.smoke else a.n, a.seed)
    signal = a.signal
    budget = cfg.revise.max_revisions if a.budget is None else a.budget
    done: dict[str, dict] = {}
    items_path = Path(a.items) if a.items else None
    if items_path and items_path.exists():  # resume: tasks already measured are read back, not rerun
        for line in items_path.read_text().splitlines():
            if line.strip():
                it = json.loads(line)
                done[it["id"]] = it
    t_load = time.perf_counter()
    todo = [] if a.no_run else [t for t in tasks if t.id not in done]
    planner = realizer = None
    if todo:
        if a.smoke:
            planner = tiny_planner(16)
        else:
            from hybrid.runtime import build_planner

            planner = build_planner(cfg)
        realizer = embedded_realizer(cfg.realizer.backend)
    r = cfg.realizer
    params = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
    load_s = time.perf_counter() - t_load
    s = cfg.score
    tse_cfg = TSEConfig(skip_ratio=s.skip_ratio, weighting=s.weighting, alpha=s.alpha, extractor=s.extractor,
                        clusterer=s.clusterer, threshold=s.similarity)  # fmt: skip
    scorer = Scorer(planner, tse_cfg, default_embedder()) if planner is not None else None
    samplers = {m: sampler_config(cfg, m) for m in ("hybrid", "diffusion")}

    t0 = time.perf_counter()
    bar = tqdm(todo, desc="bench_tse", disable=a.no_progress, file=sys.stderr, dynamic_ncols=True)
    for task in bar:
        it = phase1(task, planner=planner, realizer=realizer, params=params, samplers=samplers, scorer=scorer)
        phase2(task, it, planner=planner, realizer=realizer, params=params, samplers=samplers, scorer=scorer,
               signal=signal, max_attempts=budget, revise_cfg=cfg.revise, tau_alt=a.tau_alt)  # fmt: skip
        done[it["id"]] = it
        if items_path:
            with items_path.open("a") as f:
                f.write(json.dumps(it, default=str) + "\n")
        xs = list(done.values())
        bar.set_postfix(ar=sum(i["ar"]["correct"] for i in xs), dif=sum(i["diffusion"]["correct"] for i in xs),
                        hyb=sum(i["hybrid"]["correct"] for i in xs))  # fmt: skip
    run_s = time.perf_counter() - t0
    items = [done[t.id] for t in tasks if t.id in done]
    result = analyse(items, signal=signal, budget=budget, n_boot=a.bootstrap, tau_alt=a.tau_alt)
    result.update({
        "planner": planner.name if planner is not None else "(resumed)",
        "settings": {"samplers": {m: c.to_dict() for m, c in samplers.items()}, "tse": tse_cfg.to_dict(),
                     "realizer_max_tokens": r.max_tokens, "budget": budget, "revise": cfg.revise.model_dump(),
                     "bootstrap": a.bootstrap, "subsample_seed": a.seed, "requested_n": len(tasks)},
        "seconds": {"load": load_s, "run": run_s, "new_items": len(todo)},
    })  # fmt: skip
    report(result)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**result, "items": items}, indent=1, default=str))
    print(json.dumps(result, default=str))
    return result


def analyse(items: list[dict], *, signal: str, budget: int, n_boot: int, tau_alt: float) -> dict[str, Any]:
    """Every figure of the report from the per-task records (phase 1 + phase 2 of each task)."""
    aurocs = {m: auroc_rows(items, m, n_boot) for m in ("diffusion", "hybrid")}
    ranked = {m: sorted(SIGNALS, key=lambda k: -(aurocs[m]["auroc"][k]["value"] or 0.0)) for m in aurocs}
    t_best = calibrate(items, budget)
    modes = {
        "ar": _acc([it["ar"]["correct"] for it in items]),
        "diffusion": _acc([it["diffusion"]["correct"] for it in items]),
        "diffusion_vote": _acc([it["diffusion"]["vote_correct"] for it in items]),
        "hybrid_plan_always": _acc([it["hybrid"]["correct"] for it in items]),
        "hybrid_gated": simulate(items, t_best, budget),
        "hybrid_gated_no_revision": simulate(items, t_best, 0),
        "hybrid_gated_cv2": cross_validated(items, budget),
    }
    last = [it["hybrid"]["attempts"][-1] if it["hybrid"]["attempts"] else None for it in items]
    revision = {
        "plan_always_before": _acc([it["hybrid"]["correct"] for it in items]),
        "plan_always_after": _acc(
            [a["best_correct"] if a else it["hybrid"]["correct"] for a, it in zip(last, items, strict=True)]
        ),  # fmt: skip
        "gated_before": modes["hybrid_gated_no_revision"]["accuracy"],
        "gated_after": modes["hybrid_gated"]["accuracy"],
        "best_threshold_without_revision": simulate(items, calibrate(items, 0), 0),
        "nfe_first_draft": statistics.fmean(it["hybrid"]["nfe"] for it in items),
        "nfe_revisions_all_attempts": statistics.fmean(a["nfe_total"] if a else 0 for a in last),
        "improved_share": _acc([any(x["improved"] for x in it["hybrid"]["attempts"]) for it in items]),
        "alt_tau": tau_alt,
        "alt_nfe": statistics.fmean(it["alt"]["nfe"] for it in items),
        "alt_plan_always": _acc([it["alt"]["correct"] for it in items]),
        "alt_gated": _acc(
            [it["alt"]["correct"] if _inf(it["alt"]["rank"]) <= t_best else it["ar"]["correct"] for it in items]
        ),  # fmt: skip
    }
    return {
        "bench": "tse",
        "n": len(items),
        "topics": {k: sum(it["kind"] == k for it in items) for k in sorted({it["kind"] for it in items})},
        "auroc": aurocs,
        "signal_ranking": ranked,
        "signal": signal,
        "threshold": _jf(t_best) if math.isfinite(t_best) else str(t_best),
        "accuracy": modes,
        "accuracy_by_topic": {
            k: {m: _acc([it[m]["correct"] for it in items if it["kind"] == k]) for m in ("ar", "diffusion", "hybrid")}
            for k in sorted({it["kind"] for it in items})
        },
        "revision": revision,
        "gate_by_signal_no_revision": gate_by_signal(items),
        "threshold_sweep": [simulate(items, t, budget) for t in candidate_thresholds(items)],
        "degenerate_share": {m: _acc([bool(it[m]["degenerate"]) for it in items]) for m in ("diffusion", "hybrid")},
        "median_seconds": {
            "ar_answer": statistics.median(it["ar"]["seconds"] for it in items),
            "ar_ttft": statistics.median(it["ar"]["ttft_s"] or 0 for it in items),
            "diffusion_answer": statistics.median(it["diffusion"]["seconds"] for it in items),
            "hybrid_plan": statistics.median(it["hybrid"]["plan_seconds"] for it in items),
        },
    }


def _f(x: Any, nd: int = 3) -> str:
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def report(r: dict) -> None:
    print(f"planner {r.get('planner')}; {r['n']} tasks {r['topics']}")
    for m, t in r["auroc"].items():
        print(f"\nAUROC for a wrong {m} answer ({t['n_right']} right, {t['n_wrong']} wrong; 95% bootstrap CI):")
        print("| signal | AUROC | 95% CI |")
        print("| --- | ---: | --- |")
        for k, v in t["auroc"].items():
            print(f"| {k} | {_f(v['value'])} | [{_f(v['lo'])}, {_f(v['hi'])}] |")
    acc = r["accuracy"]
    print(f"\nsignal {r['signal']}, threshold {r['threshold']}")
    gated, cv, norev = acc["hybrid_gated"], acc["hybrid_gated_cv2"], acc["hybrid_gated_no_revision"]
    print(
        f"accuracy: ar {_f(acc['ar'])} | diffusion {_f(acc['diffusion'])} (vote {_f(acc['diffusion_vote'])}) | "
        f"hybrid, plan always handed over {_f(acc['hybrid_plan_always'])} | hybrid gated {_f(gated['accuracy'])} "
        f"(2-fold CV {_f(cv['accuracy'])}; no revision {_f(norev['accuracy'])})"
    )
    g = acc["hybrid_gated"]
    print(
        f"hybrid gated: {g['trusted']} trusted plans, accuracy {_f(g['accuracy_trusted'])} (ar on the same "
        f"{_f(g['ar_accuracy_on_trusted'])}); {g['unplanned']} unplanned, accuracy {_f(g['accuracy_unplanned'])}"
    )
    print("revision: " + json.dumps({k: v for k, v in r["revision"].items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
