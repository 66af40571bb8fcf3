"""Embed hybrid's nodes in your own LangGraph graph.

A small agent: a router decides whether a question needs a plan (long, how-to questions) or can be answered
by the realizer directly; planned answers go through hybrid's plan -> score -> revise -> realize nodes, and
every answer is persisted per thread in SQLite, so running the script twice continues the conversation.

    python examples/custom_graph.py "How do I repot a plant?" --thread demo
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Literal

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from hybrid import HybridConfig, HybridContext, HybridState, build_context, nodes


def needs_plan(state: HybridState, runtime: Runtime[HybridContext]) -> Literal["plan", "realize"]:
    """plan: how-to / multi-step questions; realize: short factual ones (the realizer answers alone)."""
    q = state.question.lower()
    return "plan" if q.startswith(("how", "plan", "list", "what steps")) or len(q.split()) > 12 else "realize"


def build(checkpointer=None):
    g = StateGraph(HybridState, context_schema=HybridContext)
    g.add_node("begin", nodes.begin)
    g.add_node("plan", nodes.plan)
    g.add_node("score", nodes.score)
    g.add_node("revise", nodes.revise)
    g.add_node("realize", nodes.realize)
    g.add_edge(START, "begin")
    g.add_conditional_edges("begin", needs_plan, {"plan": "plan", "realize": "realize"})
    g.add_edge("plan", "score")
    g.add_conditional_edges("score", nodes.route_after_score, {"revise": "revise", "realize": "realize"})
    g.add_edge("revise", "score")
    g.add_edge("realize", END)
    return g.compile(checkpointer=checkpointer)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question")
    ap.add_argument("--thread", default="demo")
    ap.add_argument("--db", default="examples-conversations.sqlite")
    args = ap.parse_args()
    ctx = build_context(HybridConfig.load(**{"realizer.max_tokens": 160}), progress=print)
    async with AsyncSqliteSaver.from_conn_string(args.db) as saver:
        graph = build(saver)
        config = {"configurable": {"thread_id": args.thread}}
        async for kind, chunk in graph.astream(
            {"question": args.question}, config, context=ctx, stream_mode=["custom", "values"]
        ):
            if kind == "custom" and chunk["type"] == "plan":
                print(f"[plan in {chunk['plan_ms']:.0f} ms] {chunk['text']}\n")
            elif kind == "custom" and chunk["type"] == "token":
                print(chunk["text"], end="", flush=True)
            elif kind == "values":
                final = chunk
        print(f"\n\n[{len(final['history']) // 2} turn(s) in thread {args.thread!r}]")


if __name__ == "__main__":
    asyncio.run(main())
