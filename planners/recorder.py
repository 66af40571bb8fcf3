"""What the sampler keeps about its run: per-step timing and, when asked, the trajectory of every row.

The denoising loop (`planners.sampler`) hands each step's tensors to a `StepRecorder`; they stay on the
device until the run ends and are moved to the host in one go (`trajectories`), so recording adds no host
sync per step. With record_trajectory=False the loop never builds a recorder and keeps nothing extra.
This module knows the `Trajectory` format and nothing about models, strategies or tokenizers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from planners.trajectory import Trajectory, TrajectoryStep


class StepClock:
    """Per-step wall time without a host sync per step: CUDA events on GPU (read once at the end),
    perf_counter elsewhere (CPU ops run synchronously, so the clock is honest there)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        m = self.marks
        if self.cuda:
            torch.cuda.synchronize()
            return [m[i].elapsed_time(m[i + 1]) / 1e3 for i in range(len(m) - 1)]
        return [m[i + 1] - m[i] for i in range(len(m) - 1)]


class StepRecorder:
    """Collects per-step tensors over the generation span [gen_start, L) of every row.

    x0-hat = where(masked before the step, argmax, x) (TSE, arXiv 2508.09138). The argmax and entropy of a position
    come from the latest forward that computed its prediction: every step for the no-cache and prefix-cache
    windows; for the dual cache, positions past the current block keep those of the block-start refresh."""

    def __init__(self, x: torch.Tensor, gen_start: int, mask_id: int) -> None:
        self.gen_start, self.mask_id = gen_start, mask_id
        self.pred = x[:, gen_start:].clone()  # (B, G) latest argmax per span position
        self.entropy = torch.zeros(self.pred.shape, device=x.device)  # (B, G) its entropy, nats
        self.steps: list[dict[str, torch.Tensor]] = []
        self.blocks: list[int] = []

    def observe(self, pl: int, ph: int, token: torch.Tensor, entropy: torch.Tensor) -> None:
        """This step's greedy predictions (argmax, entropy), (B, ph - pl), for span positions [pl, ph)."""
        self.pred[:, pl - self.gen_start : ph - self.gen_start] = token
        self.entropy[:, pl - self.gen_start : ph - self.gen_start] = entropy.float()

    def step(
        self,
        block: int,
        lo: int,
        hi: int,
        span_before: torch.Tensor,  # (B, G) span tokens before this step's commits
        span_after: torch.Tensor,  # (B, G) after commits and remasking
        *,
        commit: torch.Tensor,  # (B, W) bool over the block [lo, hi)
        prob: torch.Tensor,  # (B, W) probability of each position's candidate token
        remasked: torch.Tensor | None,  # (B, W) bool or None
    ) -> None:
        g0 = self.gen_start
        s_lo = max(lo, g0)  # the block may start in the prompt (masked prompt slots): those are not recorded
        masked_before = span_before == self.mask_id
        n_masked = masked_before.sum(-1)
        mean_ent = torch.where(masked_before, self.entropy, 0.0).sum(-1) / n_masked.clamp(min=1)

        def on_span(t: torch.Tensor) -> torch.Tensor:  # block-local (B, W) -> span (B, G), zeros elsewhere
            out = torch.zeros(span_before.shape, dtype=t.dtype, device=t.device)
            out[:, s_lo - g0 : hi - g0] = t[:, s_lo - lo :]
            return out

        self.blocks.append(block)
        self.steps.append(
            dict(
                committed=on_span(commit),
                conf=on_span(prob.float()),
                x0_hat=torch.where(masked_before, self.pred, span_before),
                remasked=on_span(remasked if remasked is not None else torch.zeros_like(commit)),
                masked_after=(span_after == self.mask_id).sum(-1),
                mean_entropy=torch.where(n_masked > 0, mean_ent, float("nan")),
            )
        )

    def filled(self, filled: torch.Tensor) -> None:
        """Early stop: `filled` (B, G) positions were set to EOS by rule after the last recorded step. They join
        that step's commits with confidence 1.0, so the commits still partition the span and a revise loop
        ranking by confidence does not spend its budget on the EOS tail."""
        if not self.steps:
            return
        last = self.steps[-1]
        last["committed"] = last["committed"] | filled
        last["conf"] = torch.where(filled, 1.0, last["conf"])
        last["masked_after"] = last["masked_after"] - filled.sum(-1)

    def trajectories(
        self, x: torch.Tensor, valid: torch.Tensor, nfe: int, step_seconds: list[float], meta: dict[str, Any]
    ) -> list[Trajectory]:
        """Stack the step tensors, move them to the host once, build one Trajectory per row."""
        g0 = self.gen_start
        prompt_len = valid[:, :g0].sum(-1).tolist()
        final = x[:, g0:].tolist()
        n = len(self.steps)
        cpu = {k: torch.stack([s[k] for s in self.steps]).cpu() for k in self.steps[0]} if n else {}
        out = []
        for b in range(x.shape[0]):
            steps = []
            for s in range(n):
                committed = cpu["committed"][s, b].nonzero().flatten().tolist()
                me = float(cpu["mean_entropy"][s, b])
                steps.append(
                    TrajectoryStep(
                        step=s,
                        block=self.blocks[s],
                        committed=committed,
                        confidences=cpu["conf"][s, b, committed].tolist(),
                        x0_hat=cpu["x0_hat"][s, b].tolist(),
                        remasked=cpu["remasked"][s, b].nonzero().flatten().tolist(),
                        masked_after=int(cpu["masked_after"][s, b]),
                        mean_entropy=None if math.isnan(me) else me,
                        seconds=step_seconds[s] if s < len(step_seconds) else 0.0,
                    )
                )
            out.append(Trajectory(int(prompt_len[b]), x.shape[1] - g0, self.mask_id, steps, final[b], nfe, dict(meta)))
        return out
