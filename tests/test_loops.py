"""The repetition-loop guard: what it stops, what it lets through."""

from __future__ import annotations

from realizers.loops import LoopGuard, ends_in_loop, loop_share


def _feed(ids):
    g = LoopGuard()
    for i, t in enumerate(ids):
        if g.push(t):
            return i, g.loop
    return None, None


def test_a_sentence_said_twice_back_to_back_stops_at_the_second_copy():
    sentence = list(range(100, 112))  # 12 tokens
    at, loop = _feed([1, 2, 3] + sentence + sentence + [7, 8])
    assert at == 3 + 2 * len(sentence) - 1 and loop == (12, 2)


def test_short_units_need_a_long_run():
    at, loop = _feed([5, 9] * 7)  # "a b" seven times = 14 tokens: not yet
    assert at is None
    at, loop = _feed([5, 9] * 8)  # 16 tokens of "a b": a loop
    assert at == 15 and loop == (2, 8)
    at, _ = _feed([4] * 15)
    assert at is None
    assert _feed([4] * 16)[0] == 15


def test_ordinary_text_is_not_a_loop():
    # a list with repeated structure but different content, and a short word said three times
    ids = [1, 50, 51, 52, 2, 1, 60, 61, 62, 2, 1, 70, 71, 72, 2, 9, 9, 9, 3]
    assert _feed(ids) == (None, None)
    assert ends_in_loop(list(range(200))) is None


def test_loop_share_counts_outputs_with_a_loop_anywhere():
    looped = [1, 2] + list(range(10, 20)) * 2 + [3]
    assert loop_share([looped, list(range(40)), [5] * 20, []]) == 0.5


def test_the_decode_loop_ends_a_looping_stream_only_when_asked():
    import threading

    from realizers.base import SamplingParams
    from realizers.embedded import _decode, _Prepared

    sentence = list(range(100, 110))  # a 10-token unit, said over and over

    def run(stop_loops: bool):
        out: list[str] = []
        prep = _Prepared(3, iter([1, 2] + sentence * 20), lambda ids: " ".join(map(str, ids)), lambda t: False)
        n, finish = _decode(prep, SamplingParams(max_tokens=100, stop_loops=stop_loops), threading.Event(), out.append)
        return n, finish, "".join(out)

    n, finish, text = run(True)
    assert (n, finish) == (2 + 2 * len(sentence), "stop")
    assert text.split() == [str(t) for t in [1, 2] + sentence * 2]
    n, finish, _ = run(False)
    assert (n, finish) == (100, "length")
