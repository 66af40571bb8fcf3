"""Stop a stream caught in a loop: the same run of tokens, back to back, at the end of the output.

Small models decoding greedily repeat themselves until max_tokens ("Then add the tea. Then add the tea. ..."):
SmolLM2-135M did on most how-to questions (benchmarks/README.md, "Answers that end"). `LoopGuard` watches the
token ids as they are sampled and says stop as soon as the output ends in a repeated unit:

- a unit of at least `long_unit` tokens (a clause or sentence) seen `long_copies` times in a row (default 2:
  a sentence said twice over, back to back, is already a loop), or
- a shorter unit repeated until the repeated run covers `short_span` tokens ("a a a a ...", "the the ...").

The check costs one slice comparison per candidate period per token (periods up to `max_unit`), so it runs
inside the decode loop. It knows token ids only: no tokenizer, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoopGuard:
    long_unit: int = 8  # tokens: a unit this long repeated `long_copies` times is a loop
    long_copies: int = 2
    short_span: int = 16  # tokens: shorter units must repeat over at least this many tokens (and 3 times)
    max_unit: int = 64  # longest unit looked for
    ids: list[int] = field(default_factory=list)
    loop: tuple[int, int] | None = None  # (unit length, copies) once a loop was found

    def push(self, token: int) -> bool:
        """Add one sampled token; True when the output now ends in a loop (stop the stream)."""
        self.ids.append(int(token))
        found = ends_in_loop(self.ids, self.long_unit, self.long_copies, self.short_span, self.max_unit)
        if found is not None:
            self.loop = found
        return found is not None


def ends_in_loop(
    ids: list[int], long_unit: int = 8, long_copies: int = 2, short_span: int = 16, max_unit: int = 64
) -> tuple[int, int] | None:
    """(unit length, copies) if `ids` ends in a repeated unit by the rules in the module docstring, else None."""
    n = len(ids)
    for p in range(1, min(max_unit, n // 2) + 1):
        need = long_copies if p >= long_unit else max(3, -(-short_span // p))
        if need * p > n:
            continue
        unit = ids[n - p :]
        if all(ids[n - (k + 1) * p : n - k * p] == unit for k in range(1, need)):
            return p, need
    return None


def loop_share(outputs: list[list[int]], **rules) -> float:
    """Share of outputs that contain a loop anywhere (each prefix checked), for benchmarks."""
    if not outputs:
        return 0.0
    looped = 0
    for ids in outputs:
        guard = LoopGuard(**rules)
        if any(guard.push(t) for t in ids):
            looped += 1
    return looped / len(outputs)
