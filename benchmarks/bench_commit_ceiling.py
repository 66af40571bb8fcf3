"""The ceiling of commit rules: how many tokens per pass could any commit rule get out of this planner?

An oracle commit rule knows the plan the planner writes at one token per pass (the reference) and, at every
step, commits every masked position whose current argmax already is the reference's token there (the top-1
position only when none is). No rule that reads the step's statistics can know more about which tokens are
final, so the oracle's tokens per pass bound what a better commit rule (learned or hand-set) can reach with
this planner, at the reference's quality. It is run against two references: the one-token-per-pass plan and
the product rule's own plan (`planner.commit`, `planner.threshold`).

For each held-out prompt (`planners.adapt.data.make_prompts`, topics never seen in training), in one process:
  - the planner at one token per pass (commit="learned" at threshold 1.0: the policy never fires, so each
    pass commits its top-1 position; the end-of-answer rule still applies);
  - the planner with the product's rule;
  - the oracle against each of the two;
  - the realizer (llama.cpp, the packaged Q4_1 GGUF) writing the same number of tokens greedily, timed.
Then: passes per plan and tokens per pass per row, how often the oracle reproduced its reference exactly, and
what the oracle's passes would cost at the product rule's measured ms per pass, as a ratio to the realizer's
time ("plan / realizer at the ceiling": under 1 would mean a commit rule alone could close the gap).

    python -m benchmarks.bench_commit_ceiling
    python -m benchmarks.bench_commit_ceiling --adapter planners/weights/smollm2-planner-blocks4.safetensors \
        --set planner.block_length=4 --set planner.threshold=0.85

Prints a table; the whole result is JSON on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=20, help="held-out free-text prompts")
    p.add_argument("--gen-length", type=int, default=48)
    p.add_argument("--engine", default="llama_q8_0", help="torch_fp32 or llama_<weights> (bench_plan_vs_ar's names)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default=None, help="planner adapter .safetensors (default: the shipped one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--no-realizer", action="store_true", help="skip the realizer timing (no ratios)")
    return p.parse_args(argv)


def oracle_rule(reference: torch.Tensor):
    """A commit rule (`planners.strategies.CommitInputs` -> (B, W) bool) that commits every masked position
    whose argmax equals `reference` (B, gen_length) there, or the top-1 position when none does."""
    from planners.strategies import top_k_mask

    def rule(c) -> torch.Tensor:
        if c.stats is None or c.span_offset is None:
            raise ValueError("the oracle reads the step's statistics: run it as commit='learned'")
        w = c.masked.shape[-1]
        ref = reference[:, c.span_offset : c.span_offset + w].to(c.stats.token.device)
        hit = torch.zeros_like(c.masked)
        hit[:, : ref.shape[1]] = c.stats.token[:, : ref.shape[1]] == ref
        hit &= c.masked
        top1 = top_k_mask(c.score, torch.ones_like(c.score[:, 0], dtype=torch.long)) & c.masked
        return torch.where(hit.any(-1, keepdim=True), hit, top1)

    return rule


@contextlib.contextmanager
def commit_rule_as_learned(rule):
    """Run `rule` wherever the sampler would run commit='learned' (the sampler then fills the statistics a
    learned rule reads)."""
    from planners.strategies import COMMITS

    saved = COMMITS["learned"]
    COMMITS["learned"] = rule
    try:
        yield
    finally:
        COMMITS["learned"] = saved


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.bench_plan_vs_ar import _cpu, load_planner, load_realizer, realize
    from benchmarks.bench_planner_quality import pick_prompts
    from hybrid.cli import parse_set
    from hybrid.config import HybridConfig
    from hybrid.runtime import sampler_config
    from planners.adapt.data import chat_prompt_ids

    hc = HybridConfig.load(**parse_set([f"planner.gen_length={a.gen_length}", f"planner.steps={a.gen_length}", *a.set]))
    sampler = sampler_config(hc)
    if sampler.commit != "learned":
        raise SystemExit(f"the product rule here is {sampler.commit!r}; this benchmark compares against 'learned'")
    planner = load_planner(a.engine, sampler, a.threads, a.adapter or hc.planner.adapter)
    prompts = pick_prompts(a.prompts, 0, a.seed)
    tok = planner.tokenizer
    llm = None if a.no_realizer else load_realizer(a.threads)
    planner.plan(prompts[0].text)  # warm-up
    if llm is not None:
        realize(llm, chat_prompt_ids(tok, prompts[0].text), 4, tok.eos_token_id)

    names = ("one_per_pass", "product", "oracle_vs_one", "oracle_vs_product")
    nfe: dict[str, list[float]] = {n: [] for n in names}
    secs: dict[str, list[float]] = {n: [] for n in names}
    same = {"oracle_vs_one": 0, "oracle_vs_product": 0}
    ar_secs: list[float] = []
    for i, p in enumerate(prompts):
        runs = {"one_per_pass": planner.plan(p.text, threshold=1.0), "product": planner.plan(p.text)}
        for name, ref in (("oracle_vs_one", runs["one_per_pass"]), ("oracle_vs_product", runs["product"])):
            span = list(ref.span or ref.tokens)
            with commit_rule_as_learned(oracle_rule(torch.tensor([span]))):
                runs[name] = planner.plan(p.text)
            same[name] += int(list(runs[name].span or runs[name].tokens) == span)
        for name, r in runs.items():
            nfe[name].append(r.stats["nfe"])
            secs[name].append(r.stats["seconds"])
        if llm is not None:
            ar_secs.append(realize(llm, chat_prompt_ids(tok, p.text), a.gen_length, tok.eos_token_id)[1])
        print(f"  prompt {i + 1}/{len(prompts)}: passes " + " / ".join(str(nfe[n][-1]) for n in names), flush=True)

    ar = statistics.mean(ar_secs) if ar_secs else None
    ms_pass = 1000 * sum(secs["product"]) / sum(nfe["product"])  # the product rule's measured cost per pass
    rows = []
    for name in names:
        passes = statistics.mean(nfe[name])
        plan_s = statistics.mean(secs[name])
        row = {
            "row": name,
            "passes": round(passes, 1),
            "tokens_per_pass": round(a.gen_length / passes, 2),
            "plan_s": round(plan_s, 3),
            "same_plan_as_reference": f"{same[name]}/{len(prompts)}" if name in same else None,
            "plan_over_realizer": round(plan_s / ar, 2) if ar else None,
            "at_product_ms_per_pass_over_realizer": round(passes * ms_pass / 1000 / ar, 2) if ar else None,
        }
        rows.append(row)
    result = {
        "prompts": len(prompts),
        "gen_length": a.gen_length,
        "engine": planner.name,
        "threads": a.threads,
        "cpu": _cpu(),
        "adapter": a.adapter or hc.planner.adapter or "shipped",
        "sampler": {k: getattr(sampler, k) for k in ("commit", "threshold", "block_length", "cache")},
        "product_ms_per_pass": round(ms_pass, 1),
        "realizer_s": round(ar, 3) if ar else None,
        "realizer_ms_per_token": round(1000 * ar / a.gen_length, 1) if ar else None,
        "rows": rows,
    }
    cols = list(rows[0])
    print(f"\n{len(prompts)} held-out prompts, {a.gen_length}-token plans, {planner.name}, {a.threads} thread(s)")
    print(f"product rule: {result['product_ms_per_pass']} ms per pass; realizer: {result['realizer_s']} s")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
