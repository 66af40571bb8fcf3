"""Quality of the embedded planner (SmolLM2-135M adapted to block diffusion) against the AR model's own plans.

On a fixed held-out prompt set (topics never seen in training, `planners.adapt.data.make_prompts`):
  - masked-token accuracy at mask ratios .25 / .5 / 1 and next-token accuracy (teacher-forced on the AR
    model's greedy plans), adapted planner vs the untrained base;
  - plans sampled by the planner (1 token per pass = static commits, and threshold commits; prefix KV cache)
    compared with the AR model's greedy plans for the same prompts: MiniLM embedding cosine, the untouched AR
    model's mean NLL per token of the plan (adapter off, causal attention: lower = more like the AR model
    would write), repeated-bigram rate, forward passes (NFE; per row: passes that committed anything);
  - correctness on checkable arithmetic questions (the answer appears as a number in the plan).
Baselines in the same run: AR greedy plans (llama-cpp, the packaged GGUF) and the base model with no adapter.

    python -m benchmarks.bench_planner_quality                       # the shipped adapter
    python -m benchmarks.bench_planner_quality --adapter runs/adapt/adapter.safetensors --prompts 8 --arith 4
    python -m benchmarks.bench_planner_quality --no-base --no-eval --thresholds 0.9 0.7 0.5 --learned 0.9 0.7 0.5

Prints a table; the whole result is JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=None, help="adapter .safetensors (default: the shipped planner)")
    p.add_argument("--prompts", type=int, default=14, help="free-text held-out prompts")
    p.add_argument("--arith", type=int, default=6, help="checkable arithmetic held-out prompts")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.7])
    p.add_argument("--learned", type=float, nargs="*", default=[], help="commit='learned' at these P(final) cut-offs")
    p.add_argument("--commit-policy", default=None, help="learned commit policy weights (default: the shipped one)")
    p.add_argument("--no-static", action="store_true", help="skip the 1-token-per-pass row")
    p.add_argument("--no-eval", action="store_true", help="skip the teacher-forced accuracy")
    p.add_argument("--refs-cache", default=None, help="JSON file caching the AR reference plans between runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the planner's weights")
    p.add_argument("--cache", default="prefix", choices=["none", "prefix", "dual"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-base", action="store_true", help="skip the untrained-base rows")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pick_prompts(n_free: int, n_arith: int, seed: int = 0):
    from planners.adapt.data import make_prompts

    held = make_prompts(seed)["heldout"]
    free = [p for p in held if p.kind != "arithmetic"][:n_free]
    arith = [p for p in held if p.kind == "arithmetic"][:n_arith]
    return free + arith


def ar_plans(prompt_ids: list[list[int]], gen_length: int, eos: int, threads: int) -> tuple[list[list[int]], float]:
    """Greedy plans from the packaged GGUF through llama-cpp (the AR model's own plans), and seconds per plan."""
    from planners.assets import smollm2_gguf_path
    from realizers.llamacpp import load_llama

    llm = load_llama(smollm2_gguf_path(), n_ctx=512, n_threads=threads)
    out, t0 = [], time.perf_counter()
    for ids in prompt_ids:
        toks: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if t == eos or len(toks) >= gen_length:
                break
            toks.append(t)
        out.append(toks)
    return out, (time.perf_counter() - t0) / max(len(prompt_ids), 1)


@torch.no_grad()
def ar_nll(model, prompt_ids: list[int], plan: list[int]) -> float:
    """Mean NLL per token of `plan` under the untouched AR model (adapter off, causal attention)."""
    from planners.model import attention_mask

    if not plan:
        return float("nan")
    ids = torch.tensor([prompt_ids + plan])
    attn = attention_mask(torch.ones_like(ids, dtype=torch.bool), pattern="causal", gen_start=0)
    model.set_adapter_enabled(False)
    try:
        logits = model(ids, attention_mask=attn)[0, len(prompt_ids) - 1 : -1].float()
    finally:
        model.set_adapter_enabled(True)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(plan)))


def repeat_rate(tokens: list[int]) -> float:
    """Fraction of repeated bigrams (0: none; the weak-planner failure is 'wool wool wool')."""
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def correct(text: str, answer: str | None) -> bool | None:
    if answer is None:
        return None
    return answer in re.findall(r"-?\d+", text.replace(",", ""))


def planner_row(name, model, scorer, tok, prompts, prompt_ids, refs, embed, cfg) -> dict:
    from planners.sampler import sample

    t0 = time.perf_counter()
    out = sample(model, prompt_ids, cfg)
    secs = time.perf_counter() - t0
    plans = out.answers()
    texts = [tok.decode(p, skip_special_tokens=True) for p in plans]
    ref_texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    per_row_passes = (out.tokens_per_step > 0).sum(0).tolist()  # (B,) passes that committed something
    cos = [float(a @ b) for a, b in zip(embed(texts), embed(ref_texts), strict=True)]
    nll = [ar_nll(scorer, ids, p) for ids, p in zip(prompt_ids, plans, strict=True)]
    checks = [correct(t, p.answer) for t, p in zip(texts, prompts, strict=True)]
    checked = [c for c in checks if c is not None]
    return {
        "row": name,
        "commit": cfg.commit + (f"@{cfg.threshold}" if cfg.commit in ("threshold", "learned") else ""),
        "nfe_batch": out.nfe,
        "passes_per_plan": round(sum(per_row_passes) / len(per_row_passes), 1),
        "tokens_per_pass": round(cfg.gen_length / (sum(per_row_passes) / len(per_row_passes)), 2),
        "cosine_vs_ar": round(sum(cos) / len(cos), 3),
        "ar_nll": round(_mean(nll), 3),
        "repeat_rate": round(sum(map(repeat_rate, plans)) / len(plans), 3),
        "mean_len": round(sum(map(len, plans)) / len(plans), 1),
        "arith_correct": f"{sum(checked)}/{len(checked)}",
        "seconds_per_plan": round(secs / len(plans), 2),
        "samples": [{"prompt": p.text, "plan": t} for p, t in zip(prompts[:3], texts[:3], strict=False)],
    }


def _cached_refs(path, prompt_ids, compute):
    """The AR reference plans (greedy: deterministic), read from / written to `path` when one is given."""
    import os

    if path and os.path.exists(path):
        d = json.loads(open(path).read())
        if d["prompt_ids"] == prompt_ids:
            return d["refs"], d["seconds_per_plan"]
    refs, secs = compute()
    if path:
        with open(path, "w") as f:
            json.dump({"prompt_ids": prompt_ids, "refs": refs, "seconds_per_plan": secs}, f)
    return refs, secs


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from planners.adapt.data import chat_prompt_ids
    from planners.adapt.evaluate import evaluate
    from planners.adapt.objective import pad_response
    from planners.assets import DEFAULT_ADAPTER, smollm2_hf_dir
    from planners.embedding import SentenceEmbedder
    from planners.loading import load_backbone
    from planners.sampler import SamplerConfig

    base = smollm2_hf_dir()
    adapter = a.adapter or str(DEFAULT_ADAPTER)
    tok = AutoTokenizer.from_pretrained(str(base))
    prompts = pick_prompts(a.prompts, a.arith, a.seed)
    prompt_ids = [chat_prompt_ids(tok, p.text) for p in prompts]
    # the LoRA merged into the weights (no adapter matmuls per pass; the same tokens: tests/test_commit_policy.py)
    adapted = load_backbone(base, adapter=adapter, mask_token_id=16, merge_adapter=True, dtype=getattr(torch, a.dtype))
    untrained = load_backbone(base, mask_token_id=16, attention="block_causal", block_size=adapted.config.block_size)
    scorer = untrained  # no adapter: the untouched AR model under the causal mask of `ar_nll`
    eos = adapted.config.eos_token_id
    meta = json.loads(open(adapter.replace(".safetensors", ".json")).read())

    refs, ar_secs = _cached_refs(a.refs_cache, prompt_ids, lambda: ar_plans(prompt_ids, a.gen_length, eos, a.threads))
    embed = SentenceEmbedder()
    block = adapted.config.block_size
    rows_eval = [
        (ids, pad_response(r + [eos], block, eos, True)[: a.gen_length])
        for ids, r in zip(prompt_ids, refs, strict=True)
    ]
    rows_eval = [(i, r[: len(r) - len(r) % block]) for i, r in rows_eval if len(r) >= block]
    results: dict = {"adapter": adapter, "prompts": len(prompts), "gen_length": a.gen_length, "cache": a.cache}
    results["dtype"] = a.dtype
    results["training"] = {
        k: meta.get("training", {}).get(k) for k in ("steps", "tokens_seen", "wall_time_s", "train_rows")
    }
    t0 = time.perf_counter()
    results["heldout_acc"] = {"adapted": evaluate(adapted, rows_eval)} if not a.no_eval else {}
    if not a.no_base and not a.no_eval:
        results["heldout_acc"]["untrained"] = evaluate(untrained, rows_eval)
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)

    ref_texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    checks = [correct(t, p.answer) for t, p in zip(ref_texts, prompts, strict=True)]
    checked = [c for c in checks if c is not None]
    rows = [
        {
            "row": "AR greedy (llama-cpp)",
            "commit": "ar",
            "nfe_batch": a.gen_length,
            "passes_per_plan": round(sum(map(len, refs)) / len(refs), 1),
            "tokens_per_pass": 1.0,
            "cosine_vs_ar": 1.0,
            "ar_nll": round(_mean([ar_nll(scorer, i, r) for i, r in zip(prompt_ids, refs, strict=True)]), 3),
            "repeat_rate": round(sum(map(repeat_rate, refs)) / len(refs), 3),
            "mean_len": round(sum(map(len, refs)) / len(refs), 1),
            "arith_correct": f"{sum(checked)}/{len(checked)}",
            "seconds_per_plan": round(ar_secs, 2),
        }
    ]
    g = a.gen_length
    static = SamplerConfig(gen_length=g, steps=g, block_length=block, cache=a.cache)  # 1 token per pass
    configs = [] if a.no_static else [("adapted", adapted, static)]
    configs += [("adapted", adapted, replace(static, commit="threshold", threshold=t)) for t in a.thresholds]
    if a.learned:
        learned = replace(static, commit="learned", commit_policy=a.commit_policy)
        configs += [("adapted", adapted, replace(learned, threshold=t)) for t in a.learned]
    if not a.no_base:
        configs.append(
            ("untrained base", untrained, SamplerConfig(gen_length=g, steps=g, block_length=block, cache=a.cache))
        )
    for name, model, cfg in configs:
        rows.append(planner_row(name, model, scorer, tok, prompts, prompt_ids, refs, embed, cfg))
        print(f"  done: {name} {rows[-1]['commit']}", flush=True)
    results["rows"] = rows

    print(f"\nheld-out (teacher-forced on {len(rows_eval)} AR plans): {json.dumps(results['heldout_acc'])}")
    cols = ["row", "commit", "passes_per_plan", "tokens_per_pass", "cosine_vs_ar", "ar_nll", "repeat_rate", "mean_len",
            "arith_correct", "seconds_per_plan"]  # fmt: skip
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    for r in rows[1:]:
        for s in r["samples"][:2]:
            print(f"[{r['row']} {r['commit']}] {s['prompt']!r} -> {s['plan'][:160]!r}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
