"""`hybrid` command line: run, graph, serve, adapt, vllm-local, compare, view.

Every failure the user can cause (bad config, empty or over-long question, missing model, unreachable
server) ends with one line on stderr and exit code 2; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from hybrid.config import MODES, ConfigError, HybridConfig, _deep_merge, _undot


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def _err(msg: str) -> None:
    print(f"hybrid: error: {msg}", file=sys.stderr)


def _progress(quiet: bool):
    start = time.time()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.time() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


# ----------------------------------------------------------------------------------------------- config
def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON config file (see README: Configuration)")
    p.add_argument("--mode", help=f"one of {', '.join(MODES)} (default hybrid)")
    p.add_argument("--steps", type=int, help="planner denoising steps (max steps for threshold commits)")
    p.add_argument("--gen-length", type=int, help="planner generation length in tokens")
    p.add_argument("--block-length", type=int, help="planner block length (semi-autoregressive blocks)")
    p.add_argument(
        "--commit",
        "--strategy",
        dest="commit",
        help="planner commit rule: learned, static, threshold, factor, dilated, entropy_bounded (--strategy: old name)",
    )
    p.add_argument("--confidence", help="what commits rank by: max_prob, margin, entropy (nats), random")
    p.add_argument(
        "--threshold", type=float, help="commit threshold (learned: P(final); threshold: confidence, nats for entropy)"
    )
    p.add_argument("--factor", type=float, help="commit=factor: Fast-dLLM's factor f")
    p.add_argument("--boost", help="planner logit boost: none, credit (dInfer's credit decoding)")
    p.add_argument("--blocks", help="planner blocks: fixed, adaptive (AdaBlock: end a block after a delimiter)")
    p.add_argument("--eos-early-stop", help="end the plan early at end of text: off, all, any, inside")
    p.add_argument("--cache", help="planner KV cache: none, prefix, dual")
    p.add_argument("--remask", help="planner remasking: none, low_confidence")
    p.add_argument("--planner-temperature", type=float, help="planner sampling temperature (0 = greedy)")
    p.add_argument("--tse-threshold", type=float, help="deprecated spelling of --score-threshold")
    p.add_argument("--score-threshold", type=float, help="accept plans whose score value is at or below this")
    p.add_argument("--adapter", help="planner adapter .safetensors ('none' = the untrained base, explicitly)")
    p.add_argument("--max-revisions", type=int, help="revision budget")
    p.add_argument("--planner-model", help="planner checkpoint directory (LLaDA / Dream / Llama) or .gguf")
    p.add_argument("--realizer-url", help="OpenAI-compatible server (e.g. vLLM) base URL; default: embedded model")
    p.add_argument("--realizer-model", help="served model name (with --realizer-url)")
    p.add_argument("--max-tokens", type=int, help="realizer max tokens")
    p.add_argument("--seed", type=int, help="planner seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_values",
        metavar="KEY=VALUE",
        help="any setting by its dotted name, e.g. planner.credit_alpha=0.5 (repeatable; VALUE is read as JSON when "
        "it parses, else as a string; wins over the flags above)",
    )


def config_from_args(args: argparse.Namespace) -> HybridConfig:
    overrides: dict[str, Any] = {
        "mode": args.mode,
        "planner.steps": args.steps,
        "planner.gen_length": args.gen_length,
        "planner.block_length": args.block_length,
        "planner.commit": args.commit,
        "planner.confidence": args.confidence,
        "planner.threshold": args.threshold,
        "planner.factor": args.factor,
        "planner.boost": args.boost,
        "planner.blocks": args.blocks,
        "planner.eos_early_stop": args.eos_early_stop,
        "planner.cache": args.cache,
        "planner.remask": args.remask,
        "planner.temperature": args.planner_temperature,
        "planner.model": args.planner_model,
        "planner.seed": args.seed,
        "score.tse_threshold": args.tse_threshold,
        "score.threshold": getattr(args, "score_threshold", None),
        "planner.adapter": getattr(args, "adapter", None),
        "revise.max_revisions": args.max_revisions,
        "realizer.max_tokens": args.max_tokens,
        "realizer.model": args.realizer_model,
    }
    if args.realizer_url:
        overrides["realizer.kind"] = "openai"
        overrides["realizer.base_url"] = args.realizer_url
    nested = _deep_merge(_undot(overrides), parse_set(getattr(args, "set_values", None) or []))
    try:
        return HybridConfig.load(args.config, **nested)
    except ConfigError as e:
        raise UserError(str(e)) from None


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as nested overrides: dotted keys (planner.credit_alpha), values read as JSON when they
    parse (0.5, true, [13, 198], null) and as strings otherwise (credit). null stays: it sets a field to None."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--set expects KEY=VALUE with a dotted setting name (planner.factor=2), got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


# ----------------------------------------------------------------------------------------------- run
def validate_question(question: str, cfg: HybridConfig) -> str:
    q = (question or "").strip()
    if not q:
        raise UserError("the question is empty")
    if len(q) > cfg.max_question_chars:
        raise UserError(
            f"the question is {len(q)} characters; the limit is {cfg.max_question_chars} (max_question_chars)"
        )
    return q


def check_fits(question: str, ctx) -> None:
    """Refuse a question that cannot fit the planner's or realizer's context, before any work."""
    from hybrid import prompts

    if ctx.planner is not None:
        diffusion = ctx.config.mode == "diffusion"
        ids = ctx.planner.encode((prompts.answer_messages if diffusion else prompts.plan_messages)(question))
        gen = ctx.config.planner.answer_length if diffusion else ctx.config.planner.gen_length
        budget = ctx.planner.context_length - gen
        if len(ids) > budget:
            raise UserError(
                f"the question is {len(ids)} tokens; the planner's context leaves room for {budget} "
                f"({ctx.planner.context_length} minus {gen} generated)"
            )
    r = ctx.realizer
    if r is not None and hasattr(r, "prompt_ids") and hasattr(r, "context_length"):
        n = len(r.prompt_ids(prompts.realizer_messages(question, None)))
        if n + ctx.config.realizer.max_tokens > r.context_length:
            raise UserError(
                f"the question is {n} tokens; with max_tokens={ctx.config.realizer.max_tokens} it exceeds the "
                f"realizer's context of {r.context_length}"
            )


async def run_once(question: str, ctx, *, thread_id: str | None, db: str | None, on_event) -> dict[str, Any]:
    from hybrid.graph import build_graph

    inputs = {"question": question, "mode": ctx.config.mode}
    config = {"configurable": {"thread_id": thread_id or "default"}}

    async def drive(graph) -> dict[str, Any]:
        final: dict[str, Any] = {}
        async for mode, chunk in graph.astream(inputs, config, context=ctx, stream_mode=["custom", "values"]):
            if mode == "custom":
                on_event(chunk)
            else:
                final = chunk
        return final

    if db:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        async with AsyncSqliteSaver.from_conn_string(db) as saver:
            return await drive(build_graph(checkpointer=saver))
    return await drive(build_graph())


def _state_json(state: Any) -> dict[str, Any]:
    d = state.model_dump() if hasattr(state, "model_dump") else dict(state)
    traj = d.get("trajectory")
    d["trajectory_summary"] = (
        {
            "steps": len(traj["steps"]),
            "nfe": traj["nfe"],
            "gen_length": traj["gen_length"],
            "committed_per_step": [len(s["committed"]) for s in traj["steps"]],
        }
        if traj
        else None
    )
    d.pop("best", None)
    return d


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    question = validate_question(args.question, cfg)
    db = args.db or cfg.checkpoint_db
    if args.thread_id and not db:
        raise UserError("--thread-id needs --db FILE (or checkpoint_db in the config) to persist the conversation")
    say = _progress(args.quiet or args.json)
    from hybrid.runtime import SetupError, build_context

    try:
        ctx = build_context(cfg, say, planner_threads=os.cpu_count())
    except SetupError as e:
        raise UserError(str(e)) from None
    check_fits(question, ctx)
    say(f"running ({cfg.mode} mode) ...")
    out = sys.stdout
    streamed = {"any": False}

    def on_event(ev: dict[str, Any]) -> None:
        if args.json:
            return
        t = ev.get("type")
        if t == "plan_block" and cfg.mode == "hybrid" and not args.quiet:
            # the plan as it forms, on stderr (the answer alone goes to stdout)
            if ev["block"] == 0 or not streamed.get("plan"):
                say("the plan, as it forms:")
                streamed["plan"] = True
            sys.stderr.write(ev["delta"].replace("\n", " "))
            if ev.get("ended"):
                sys.stderr.write(f"  [{ev['tokens']} tokens, {ev['nfe']} passes, {ev['plan_ms']:.0f} ms]\n")
                streamed["plan"] = False
            sys.stderr.flush()
        elif t == "revise":
            say(f"revision {ev['revision']}: remasked {ev['positions']} tokens")
        elif t == "token":
            if not streamed["any"]:
                out.write("\nAnswer:\n")
                streamed["any"] = True
            out.write(ev["text"])
            out.flush()
        elif t == "plan" and cfg.mode == "hybrid":
            say(f"plan drafted in {ev['plan_ms']:.0f} ms ({ev['nfe']} forward passes)")
        elif t == "status" and ev.get("stage") == "realize" and ev.get("mode") == "hybrid" and ev.get("plan") is None:
            out.write(f"No plan the score trusts after {ev.get('revisions', 0)} revision(s): answering unplanned\n")
            out.flush()
        elif t == "status" and ev.get("stage") == "realize" and ev.get("plan") is not None:
            tse = ev.get("tse")
            verdict = "accepted" if ev.get("accepted") else "best draft, not accepted"
            out.write(
                f"Plan (TSE {tse:.3f} bits, {ev.get('revisions', 0)} revision(s), {verdict}):\n{ev['plan']}\n"
                if tse is not None
                else f"Plan:\n{ev['plan']}\n"
            )
            out.flush()

    from realizers.base import RealizerError

    try:
        final = asyncio.run(run_once(question, ctx, thread_id=args.thread_id, db=db, on_event=on_event))
    except RealizerError as e:
        raise UserError(f"realizer failed: {e}") from None
    except ValueError as e:  # prompt too long for a component, and similar input problems
        raise UserError(str(e)) from None
    state = final
    if args.html:
        from hybrid.viewer import write_viewer

        print(f"viewer page: {write_viewer(state, ctx.planner, args.html)}", file=sys.stderr)
    if args.json:
        print(json.dumps(_state_json(state), indent=2, default=str))
        return 0
    t = state.get("timings", {})
    out.write("\n")
    for w in state.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    n = state.get("usage", {}).get("completion_tokens") or 0
    print(
        f"\n[{cfg.mode}] plan {t.get('plan_ms', 0):.0f} ms | NFE {int(t.get('nfe', 0))} | "
        f"TSE {state.get('tse') if state.get('tse') is None else round(state['tse'], 3)} | "
        f"revisions {state.get('revisions', 0)} | TTFT {t.get('ttft_ms', 0):.0f} ms | "
        f"{n} tokens at {t.get('tokens_per_s', 0):.1f} tok/s | total {t.get('total_ms', 0):.0f} ms"
    )
    return 0


# ----------------------------------------------------------------------------------------------- other commands
def cmd_graph(args: argparse.Namespace) -> int:
    from hybrid.graph import mermaid

    print(mermaid())
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    rc = mod.main(argv)
    return int(rc or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description="Plan in diffusion, talk in autoregression.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer one question: plan (diffusion) -> score -> revise -> stream (AR)")
    r.add_argument("question")
    _add_run_options(r)
    r.add_argument("--json", action="store_true", help="print the final state as JSON (no streaming text)")
    r.add_argument("--quiet", action="store_true", help="no progress messages")
    r.add_argument("--db", help="SQLite file that persists the conversation (with --thread-id)")
    r.add_argument("--thread-id", help="conversation id: a later run with the same id continues it")
    r.add_argument("--html", metavar="FILE", help="also write the trajectory viewer page (self-contained HTML)")
    r.set_defaults(func=cmd_run)
    g = sub.add_parser("graph", help="print the graph's mermaid drawing")
    g.set_defaults(func=cmd_graph)
    for name, help_ in (  # keys of DELEGATED
        ("adapt", "adapt an AR checkpoint into a diffusion planner (training)"),
        ("vllm-local", "prepare / start / stop a local vLLM (CPU build) realizer server"),
        ("serve", "OpenAI-compatible HTTP server for the hybrid pipeline"),
        ("compare", "compare diffusion, hybrid and AR modes on a task set"),
        ("view", "write the trajectory viewer HTML page for a run"),
    ):
        sub.add_parser(name, help=help_, add_help=False)  # listed for --help; main() dispatches these itself
    return p


DELEGATED = {
    "adapt": "planners.adapt.cli",
    "vllm-local": "realizers.local_vllm",
    "serve": "hybrid.server",
    "compare": "hybrid.compare",
    "view": "hybrid.viewer",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # argparse.REMAINDER would drop a leading --option
        try:
            return _delegate(DELEGATED[argv[0]], argv[1:])
        except UserError as e:
            _err(str(e))
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
