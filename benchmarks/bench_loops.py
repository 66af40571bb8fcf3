"""Do answers end? Loops, length-cap hits and accuracy of the embedded realizer under sampling settings.

For each sampling setting (greedy; greedy with llama.cpp's repetition penalty; SmolLM2's recommended
temperature 0.2 / top-p 0.9) the realizer answers, in AR mode with the product's prompt, held-out open
questions (how-to, concepts, comparisons: planners/adapt/data.py, held out by topic) and checkable
questions (capitals etc., answer checked by containment). Each answer is measured:

- cap: the answer ran to max_tokens (finish "length");
- loop: the answer contains a repetition loop (`realizers.loops`: a unit of >= 8 tokens twice back to back,
  or a shorter one over >= 16 tokens), on the answer re-tokenised with SmolLM2's tokenizer;
- the same with the loop guard on: the guard stops a stream at the loop, so its answer is the prefix up to
  that token (exact for greedy and for seeded sampling: stopping earlier does not change the prefix);
- accuracy on the checkable questions, with and without the guard.

    python -m benchmarks.bench_loops --n-open 24 --n-check 40 --max-tokens 256

Prints a table and a JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time


def _questions(n_open: int, n_check: int):
    from hybrid.tasks import factual_tasks, subsample
    from planners.adapt.data import make_prompts

    held = make_prompts(0)["heldout"]
    open_q = [p.text for p in held if p.kind in ("howto", "concept", "compare")][:n_open]
    return open_q, subsample(factual_tasks(), n_check)


SETTINGS = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "extra": {}},
    "greedy+penalty1.1": {"temperature": 0.0, "top_p": 1.0, "extra": {"repetition_penalty": 1.1}},
    "greedy+penalty1.3": {"temperature": 0.0, "top_p": 1.0, "extra": {"repetition_penalty": 1.3}},
    "t0.2/p0.9": {"temperature": 0.2, "top_p": 0.9, "extra": {}},
}


async def _answer(realizer, question: str, setting: dict, max_tokens: int, seed: int):
    from hybrid import prompts
    from realizers.base import Completion, SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=setting["temperature"],
        top_p=setting["top_p"],
        seed=seed,
        extra=dict(setting["extra"]),
        stop_loops=False,  # the guard is applied to the finished answer below (same prefix, exact)
    )

    async def run():
        async for ev in realizer.astream(prompts.realizer_messages(question, None), params):
            if isinstance(ev, Completion):
                return ev.text, ev.finish_reason, ev.usage.completion_tokens
        raise RuntimeError("no completion")

    return await asyncio.wait_for(run(), timeout=600)  # a hung realizer fails the benchmark, it does not stall it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-open", type=int, default=24)
    ap.add_argument("--n-check", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from hybrid.compare import check_answer
    from planners.assets import smollm2_hf_dir
    from realizers.embedded import embedded_realizer
    from realizers.loops import LoopGuard

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))
    realizer = embedded_realizer("auto")
    open_q, check = _questions(args.n_open, args.n_check)
    print(f"{len(open_q)} open questions, {len(check)} checkable; realizer {realizer.name}", file=sys.stderr)
    rows = {}
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        t0 = time.perf_counter()
        caps = loops = caps_guard = 0
        lengths, lengths_guard = [], []
        right = right_guard = 0
        for i, q in enumerate(open_q + [t.question for t in check]):
            text, finish, n = asyncio.run(_answer(realizer, q, setting, args.max_tokens, seed=i))
            ids = tok.encode(text, add_special_tokens=False)
            guard = LoopGuard()
            stop_at = next((k for k, t in enumerate(ids) if guard.push(t)), None)
            guarded = tok.decode(ids[: stop_at + 1]) if stop_at is not None else text
            if i < len(open_q):
                caps += finish == "length"
                loops += stop_at is not None
                caps_guard += finish == "length" and stop_at is None
                lengths.append(n)
                lengths_guard.append(min(n, stop_at + 1) if stop_at is not None else n)
            else:
                task = check[i - len(open_q)]
                right += bool(check_answer(task, text))
                right_guard += bool(check_answer(task, guarded))
        k = max(1, len(open_q))
        rows[name] = {
            "cap_share": caps / k,
            "loop_share": loops / k,
            "cap_share_with_guard": caps_guard / k,
            "median_tokens": statistics.median(lengths) if lengths else 0,
            "median_tokens_with_guard": statistics.median(lengths_guard) if lengths_guard else 0,
            "accuracy": right / max(1, len(check)),
            "accuracy_with_guard": right_guard / max(1, len(check)),
            "seconds": time.perf_counter() - t0,
        }
        r = rows[name]
        print(
            f"{name:>18} | cap {r['cap_share']:.0%} | loop {r['loop_share']:.0%} | cap w/ guard "
            f"{r['cap_share_with_guard']:.0%} | median tokens {r['median_tokens']} -> {r['median_tokens_with_guard']}"
            f" | acc {r['accuracy']:.0%} -> {r['accuracy_with_guard']:.0%} | {r['seconds']:.0f} s",
            file=sys.stderr,
        )
    print(json.dumps({"n_open": len(open_q), "n_check": len(check), "max_tokens": args.max_tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
