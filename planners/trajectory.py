"""Denoising trajectories: what the sampler saw at every step.

A `Trajectory` is the record of one sequence's reverse process: per step, which
positions were committed (and remasked), their confidences, and the model's full
clean-sequence estimate x0-hat = where(masked, argmax(logits), x) over the
generation span. It holds token ids only; text is decoded lazily by a callable
the caller passes (the sampler knows no tokenizer). TSE scoring, the revise loop
and the viewer read it; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrajectoryStep:
    """One denoising step of one sequence. Positions are relative to the generation span."""

    step: int  # 0-based step index over the whole run (all blocks)
    block: int  # index of the block being denoised at this step
    committed: list[int]  # positions unmasked at this step
    confidences: list[float]  # confidence of each committed position, same order
    x0_hat: list[int]  # (gen_length,) clean-sequence estimate after this step's forward pass
    remasked: list[int] = field(default_factory=list)  # committed positions re-masked at this step
    masked_after: int = 0  # number of masked positions left after the step
    mean_entropy: float | None = None  # mean token entropy (nats) over positions masked before the step
    seconds: float = 0.0  # wall time of the step (forward + selection)


@dataclass
class Trajectory:
    """The whole reverse process of one sequence."""

    prompt_length: int
    gen_length: int
    mask_id: int
    steps: list[TrajectoryStep]
    final: list[int]  # (gen_length,) final tokens of the generation span (before EOS truncation)
    nfe: int  # forward passes spent on this sequence (CFG counts 2 per step)
    meta: dict[str, Any] = field(default_factory=dict)  # sampler settings, for the record

    def __len__(self) -> int:
        return len(self.steps)

    def texts(self, decode: Callable[[Sequence[int]], str]) -> list[str]:
        """Decode x0-hat of every step (lazily: only when asked)."""
        return [decode(s.x0_hat) for s in self.steps]

    def commit_step(self) -> list[int]:
        """Per generation position, the last step at which it was committed (-1 if never)."""
        last = [-1] * self.gen_length
        for s in self.steps:
            for p in s.committed:
                last[p] = s.step
        return last

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by --json, the viewer and checkpointed graph state)."""
        return {
            "prompt_length": self.prompt_length,
            "gen_length": self.gen_length,
            "mask_id": self.mask_id,
            "nfe": self.nfe,
            "final": list(self.final),
            "meta": dict(self.meta),
            "steps": [
                {
                    "step": s.step,
                    "block": s.block,
                    "committed": list(s.committed),
                    "confidences": [round(float(c), 6) for c in s.confidences],
                    "x0_hat": list(s.x0_hat),
                    "remasked": list(s.remasked),
                    "masked_after": s.masked_after,
                    "mean_entropy": s.mean_entropy,
                    "seconds": s.seconds,
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(
            prompt_length=d["prompt_length"],
            gen_length=d["gen_length"],
            mask_id=d["mask_id"],
            nfe=d["nfe"],
            final=list(d["final"]),
            meta=dict(d.get("meta", {})),
            steps=[TrajectoryStep(**s) for s in d["steps"]],
        )
