"""Bytes on each device for a run: its model states plus the activations of its largest chunk.

The formulas are in dsdpo.planner.model_states (what ZeRO-3 allocates, item by item) and
dsdpo.planner.activations (what one forward saves for backward); memory_plan puts them together for
the run's chunk sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsdpo.planner.activations import (
    activation_bytes,
    chunk_rows,
    head_bytes,
    no_grad_activation_bytes,
    row_width,
)
from dsdpo.planner.model_states import Item, MemoryPlan, model_state_plan
from dsdpo.planner.shapes import ModelShape
from dsdpo.planner.zero_settings import dtype_bytes


@dataclass(frozen=True)
class RunShape:
    """What the planner needs to know of a run besides the model and the DeepSpeed config."""

    max_length: int = 1024  # widest row: prompt + response tokens
    response_length: int | None = None  # tokens of a response (default: max_length, the bound)
    budget: int = 8  # draws per response
    micro_batch: int = 1  # pairs per micro-batch
    accumulation: int = 1
    max_tokens_per_forward: int = 4096
    max_tokens_no_grad: int | None = None  # default 4 × max_tokens_per_forward
    gradient_checkpointing: bool = True
    reference: str = (
        "engine"  # engine | precomputed | adapter (LoRA's adapters off) | none (reference-free, SFT)
    )
    trainable_parameters: int | None = None  # LoRA's adapters (None: every parameter trains)
    masked_fraction: float = 1.0  # of response tokens masked in the heaviest chunk (1: a bound)

    @property
    def response(self) -> int:
        return self.response_length or self.max_length

    @property
    def no_grad_tokens(self) -> int:
        return self.max_tokens_no_grad or 4 * self.max_tokens_per_forward


def chunk_shape(shape: ModelShape, run: RunShape, tokens: int) -> tuple[int, int, float]:
    """(rows, tokens, masked positions) of the heaviest chunk of at most `tokens` tokens."""
    width = row_width(shape, run.max_length)
    rows = chunk_rows(tokens, width)
    rows = min(rows, 2 * run.micro_batch * run.budget)
    return rows, rows * width, rows * run.response * run.masked_fraction


def memory_plan(
    shape: ModelShape, ds_config: dict, run: RunShape, world_size: int = 1, accelerator: str = "cuda"
) -> MemoryPlan:
    plan = model_state_plan(
        shape,
        ds_config,
        reference=run.reference,
        world_size=world_size,
        accelerator=accelerator,
        trainable_parameters=run.trainable_parameters,
    )
    b = dtype_bytes(ds_config)
    rows, tokens, masked = chunk_shape(shape, run, run.max_tokens_per_forward)
    no_grad_rows, no_grad_tokens, no_grad_masked = chunk_shape(shape, run, run.no_grad_tokens)
    grad = activation_bytes(shape, tokens, masked, b, checkpointing=run.gradient_checkpointing)
    other = activation_bytes(shape, tokens, masked, b, checkpointing=not run.gradient_checkpointing)
    no_grad = no_grad_activation_bytes(shape, no_grad_tokens, no_grad_masked, b)
    label = "with" if run.gradient_checkpointing else "without"
    plan.gpu.append(
        Item(
            f"activations of the largest chunk ({label} checkpointing; with or without gradients)",
            max(grad, no_grad),
            phase="backward",
        )
    )
    plan.chunk = {
        "rows": rows,
        "tokens": tokens,
        "masked": masked,
        "no_grad_rows": no_grad_rows,
        "no_grad_tokens": no_grad_tokens,
        "activations": grad,
        "activations_other_checkpointing": other,
        "activations_no_grad": no_grad,
        "output_layer": head_bytes(shape, masked),
    }
    return plan
