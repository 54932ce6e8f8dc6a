"""Parameter sweeps (forward or backward calls) per optimizer step: what the time of a step counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsdpo.planner.activations import chunk_rows, row_width
from dsdpo.planner.memory import RunShape
from dsdpo.planner.shapes import ModelShape


@dataclass(frozen=True)
class Sweeps:
    """Parameter sweeps (forward or backward calls) of one optimizer step, as dsdpo.objective.gradient
    counts them."""

    reference: int
    policy_no_grad: int
    policy_grad: int  # forward calls with gradients (each is followed by a backward)
    one_pass: bool

    @property
    def total(self) -> int:
        return self.reference + self.policy_no_grad + 2 * self.policy_grad


def sweeps_per_step(shape: ModelShape, run: RunShape) -> Sweeps:
    rows = 2 * run.micro_batch * run.budget  # chosen and rejected, `budget` draws each
    width = row_width(shape, run.max_length)
    grad_calls = math.ceil(rows / chunk_rows(run.max_tokens_per_forward, width))
    no_grad_calls = math.ceil(rows / chunk_rows(run.no_grad_tokens, width))
    one_pass = grad_calls == 1
    reference = no_grad_calls if run.reference in ("engine", "adapter") else 0
    steps = run.accumulation
    return Sweeps(
        reference=steps * reference,
        policy_no_grad=0 if one_pass else steps * no_grad_calls,
        policy_grad=steps * grad_calls,
        one_pass=one_pass,
    )
