r"""The prebuilt graph: wiring only (the logic lives in `hybrid.nodes`).

START -> begin -> (mode) -> plan -> score -> (accepted | budget spent) -> realize -> END
                     \                  \--(revise)--> revise -> score
                      \-- ar --> realize
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from hybrid import nodes
from hybrid.state import HybridContext, HybridState


def build_graph(*, checkpointer: Any = None, name: str = "hybrid") -> Any:
    """Compile the hybrid graph. It takes `HybridState` input (`{"question": ...}` is enough), a
    `HybridContext` as `context=`, and works as a subgraph of a larger graph with the same state keys."""
    g = StateGraph(HybridState, context_schema=HybridContext)
    g.add_node("begin", nodes.begin)
    g.add_node("plan", nodes.plan)
    g.add_node("score", nodes.score)
    g.add_node("revise", nodes.revise)
    g.add_node("realize", nodes.realize)
    g.add_edge(START, "begin")
    g.add_conditional_edges("begin", nodes.route_start, {"plan": "plan", "realize": "realize"})
    g.add_edge("plan", "score")
    g.add_conditional_edges("score", nodes.route_after_score, {"revise": "revise", "realize": "realize"})
    g.add_edge("revise", "score")
    g.add_edge("realize", END)
    return g.compile(checkpointer=checkpointer, name=name)


def mermaid() -> str:
    return build_graph().get_graph().draw_mermaid()
