"""Every prompt the product sends, in one place: what the planner is asked to draft, and how the plan
reaches the realizer (inside the system turn; the realizer follows it without reading it aloud)."""

from __future__ import annotations

from collections.abc import Sequence

# The embedded planner was adapted on the instruct model's own answers to plain questions
# (planners/adapt/data.py), so it is asked the question as is: its short draft of the answer's opening and
# structure is the plan. Larger planners (LLaDA, Dream) can take a more explicit request here.
PLAN_REQUEST = "{question}"
ANSWER_REQUEST = "{question}"

REALIZER_SYSTEM = "You are a helpful assistant. Answer clearly and concisely."
REALIZER_SYSTEM_WITH_PLAN = (
    "You are a helpful assistant. Answer clearly and concisely.\n"
    "A planner drafted the outline below. Follow it to structure your answer, but do not mention the plan "
    "or read it out.\n\nOutline:\n{plan}"
)


def plan_messages(question: str, history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    """What the diffusion planner sees in hybrid mode: recent turns, then the plan request."""
    return [*_recent(history), {"role": "user", "content": PLAN_REQUEST.format(question=question)}]


def answer_messages(question: str, history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    """What the planner sees in diffusion mode (it writes the answer itself)."""
    return [*_recent(history), {"role": "user", "content": ANSWER_REQUEST.format(question=question)}]


def realizer_messages(question: str, plan: str | None, history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    system = REALIZER_SYSTEM_WITH_PLAN.format(plan=plan.strip()) if plan else REALIZER_SYSTEM
    return [{"role": "system", "content": system}, *history, {"role": "user", "content": question}]


def _recent(history: Sequence[dict[str, str]], turns: int = 2) -> list[dict[str, str]]:
    # the small planner gets only the last few turns: its context is short and its job is the outline
    return list(history)[-2 * turns :]
