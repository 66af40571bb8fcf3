"""Graph state: plain, serialisable data only (pydantic), so any LangGraph checkpointer can persist it.
Models and clients travel in `HybridContext` (the runtime context), never here."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field

from hybrid.config import HybridConfig


class HybridState(BaseModel):
    # input
    question: str = ""
    mode: str | None = None  # None = config.mode
    # conversation (appended by the realize node; persisted by a checkpointer)
    history: Annotated[list[dict[str, str]], operator.add] = Field(default_factory=list)
    # planning
    plan: str | None = None
    plan_tokens: list[int] = Field(default_factory=list)
    plan_span: list[int] = Field(default_factory=list)
    prompt_ids: list[int] = Field(default_factory=list)
    trajectory: dict[str, Any] | None = None  # Trajectory.to_dict() of the current draft
    plan_stats: dict[str, Any] = Field(default_factory=dict)
    # scoring and revision
    # the current draft's score (hybrid.nodes.score_summary): "value" = the configured signal (higher = less
    # trustworthy), "signal", "signals", "degenerate" (why the draft is a loop / near-empty, else None), "tse", ...
    score: dict[str, Any] | None = None
    tse: float | None = None
    revisions: int = 0
    revision_history: list[dict[str, Any]] = Field(default_factory=list)
    best: dict[str, Any] | None = None  # best draft so far: plan, tokens, span, trajectory, tse, value, rank, score
    accepted: bool | None = None  # the best draft is trusted; hybrid hands over no plan when False
    # answer
    answer: str = ""
    usage: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


@dataclass
class HybridContext:
    """Heavy objects the nodes use: passed as `context=` when invoking the graph."""

    config: HybridConfig
    planner: Any = None  # planners.planner.Planner (None in pure AR mode)
    realizer: Any = None  # realizers.base.Realizer (None in pure diffusion mode)
    embed: Any = None  # callable texts -> unit vectors, for the embedding clusterer (None = load lazily)
