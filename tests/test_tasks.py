"""The factual task set: big enough, well-formed, checkable, held out by topic from the adaptation data."""

from __future__ import annotations

from collections import Counter

from hybrid.compare import check_answer
from hybrid.tasks import CAPITALS, TOPICS, factual_tasks, subsample
from planners.adapt.data import COUNTRIES, make_prompts


def test_at_least_300_unique_checkable_tasks_over_every_topic():
    tasks = factual_tasks()
    assert len(tasks) >= 300
    assert len({t.id for t in tasks}) == len(tasks) and len({t.question for t in tasks}) == len(tasks)
    assert all(t.checkable and t.checker == "contains" for t in tasks)
    counts = Counter(t.kind for t in tasks)
    assert set(counts) == set(TOPICS) and min(counts.values()) >= 20


def test_held_out_by_topic_from_the_adaptation_data():
    adapt_countries = {c.casefold() for c, _ in COUNTRIES}
    mine = {c.casefold().removeprefix("the ") for c, _ in CAPITALS}
    assert not adapt_countries & mine
    prompts = {p.text.casefold() for split in make_prompts(0).values() for p in split}
    assert not prompts & {t.question.casefold() for t in factual_tasks()}


def test_the_checker_reads_answers_as_whole_words():
    t = {t.question: t for t in factual_tasks()}
    assert check_answer(t["What is the capital of Iceland?"], "The capital of Iceland is Reykjavik.")
    assert not check_answer(t["What is the capital of Iceland?"], "The capital of Iceland is Oslo.")
    gold = t["What is the chemical symbol for gold?"]
    assert check_answer(gold, "Gold's symbol is Au.") and not check_answer(gold, "It is Ag, or maybe autumn.")
    assert check_answer(t["How many minutes are in an hour?"], "There are sixty minutes in an hour.")
    assert not check_answer(t["How many minutes are in an hour?"], "An hour has 600 seconds.")
    # no question's accepted answer is already in the question (echoing it would score)
    assert not [q for q, task in t.items() if check_answer(task, q)]


def test_subsample_is_deterministic_and_spread_over_topics():
    tasks = factual_tasks()
    a, b = subsample(tasks, 70, seed=1), subsample(tasks, 70, seed=1)
    assert a == b and len(a) == 70 and len({x.id for x in a}) == 70
    assert set(Counter(x.kind for x in a)) == set(TOPICS)
    assert subsample(tasks, None) == tasks
