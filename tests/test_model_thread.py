"""The planner's model thread (`planners.model_thread`): every model call of a planner runs on one thread, whatever
thread asks, including the batching front's; nested calls run inline; errors and context variables travel."""

from __future__ import annotations

import contextvars
import threading

import pytest

from planners.batching import BatchingPlanner
from planners.model_thread import ModelThread


def test_calls_run_on_one_thread_and_nest_inline():
    t = ModelThread("test-model")
    idents = {t.call(threading.get_ident) for _ in range(3)}
    from_others: list[int] = []
    workers = [threading.Thread(target=lambda: from_others.append(t.call(threading.get_ident))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(idents) == 1 and set(from_others) == idents and threading.get_ident() not in idents
    assert t.call(lambda: t.call(lambda: 7) + 1) == 8  # a call from the model thread itself does not deadlock
    t.close()


def test_errors_and_context_variables_reach_the_caller():
    t = ModelThread("test-model")
    var = contextvars.ContextVar("who", default="nobody")
    var.set("caller")
    assert t.call(var.get) == "caller"
    with pytest.raises(ZeroDivisionError):
        t.call(lambda: 1 / 0)
    assert t.call(lambda: "still serving") == "still serving"
    t.close()


def _plan_threads(planner, callers: int) -> tuple[set[int], set[int]]:
    """Plan from `callers` threads at once; the threads the caller ran on and those the blocks were reported on."""
    seen: set[int] = set()
    callers_seen: set[int] = set()

    def one():
        callers_seen.add(threading.get_ident())
        planner.plan("Name a colour.", on_block=lambda p: seen.add(threading.get_ident()))

    threads = [threading.Thread(target=one) for _ in range(callers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return callers_seen, seen


def test_plans_from_many_threads_run_on_the_planners_thread(tiny_planner):
    home = tiny_planner.thread.call(threading.get_ident)
    callers, ran_on = _plan_threads(tiny_planner, 3)
    assert ran_on == {home} and home not in callers
    first = tiny_planner.plan("Name a colour.")
    again = tiny_planner.thread.call(tiny_planner.plan, "Name a colour.")  # from the model thread: inline
    assert again.tokens == first.tokens


def test_the_batching_front_denoises_on_the_planners_thread(tiny_planner):
    home = tiny_planner.thread.call(threading.get_ident)
    batcher = BatchingPlanner(tiny_planner, max_batch=4, window_s=0.05)
    try:
        _, ran_on = _plan_threads(batcher, 3)
        assert ran_on == {home}
        assert batcher.metrics.plan_rows == 3
    finally:
        batcher.close()
