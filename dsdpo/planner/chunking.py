"""--max-tokens-per-forward auto: how many tokens a chunk may hold, from the planner's formulas.

auto: the largest chunks (whole rows of --max-length tokens) whose activations, by the planner's
formulas (dsdpo/planner/activations.py and model_states.py, every response position masked: a
bound), fit in 90% of the device memory free when training starts, less the model states that come
and go during the forward and backward calls (gathered parameters, a module's gradients,
reduce-scatter's copy of a bucket). The same for the forwards without gradients, unless
--max-tokens-no-grad is given. Unset (the default) means auto on CUDA and 4096 elsewhere.

Which rows go in which chunk is dsdpo/objective/chunks.py; a step whose chunk runs out of memory
anyway is redone with smaller ones by dsdpo/training/out_of_memory.py. The CUDA allocator's free
memory is not seen on the CPU: there the same code runs on the CPU's available RAM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsdpo.config import DEFAULT_TOKENS
from dsdpo.planner.activations import activation_bytes, no_grad_activation_bytes, row_width
from dsdpo.planner.memory import RunShape
from dsdpo.planner.model_states import model_state_plan
from dsdpo.planner.shapes import ModelShape, model_shape
from dsdpo.planner.zero_settings import dtype_bytes

SAFETY = 0.9  # of the free memory; the rest is the allocator's fragmentation and what was not counted


def free_device_bytes(device: torch.device) -> int:
    """Free memory of the accelerator (CUDA's free memory; the CPU's available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def auto_chunk_tokens(model, ds_config: dict, run: RunShape, free_bytes: float) -> tuple[int, int, float]:
    """(tokens with gradients, tokens without, the bytes budget): the largest whole-row chunks that fit
    (`model`: a model folder, config, or its ModelShape)."""
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    b = dtype_bytes(ds_config)
    # What the forward and backward add beside activations (resident items are allocated when the
    # free memory is read; the optimizer boundary comes after the activations are freed).
    transient = sum(
        item.bytes
        for item in model_state_plan(shape, ds_config, reference=run.reference).gpu
        if item.phase == "backward"
    )
    budget = SAFETY * free_bytes - transient
    most = 2 * run.micro_batch * run.budget  # rows of a micro-batch
    response = run.response * run.masked_fraction

    def fitting(cost: Callable[[int], float]) -> int:
        rows = 1
        while rows < most and cost(rows + 1) <= budget:
            rows += 1
        return rows

    width = row_width(shape, run.max_length)  # a block model's rows are [noised ; clean]
    grad_rows = fitting(
        lambda r: activation_bytes(
            shape, r * width, r * response, b, checkpointing=run.gradient_checkpointing
        )
    )
    no_grad_rows = fitting(lambda r: no_grad_activation_bytes(shape, r * width, r * response, b))
    return grad_rows * width, no_grad_rows * width, budget


def resolve_chunk_sizes(
    score, *, model: str, ds_config: dict, max_length: int, budget: int, micro_batch: int,
    gradient_checkpointing: bool, reference: str, device: torch.device,
) -> str | None:  # fmt: skip
    """Fill score.max_tokens_per_forward (and max_tokens_no_grad when unset) for "auto" or unset;
    return the line that says what was chosen, or None when nothing was to choose."""
    value = score.max_tokens_per_forward
    if isinstance(value, int):
        return None
    if value is None and device.type != "cuda":
        score.max_tokens_per_forward = DEFAULT_TOKENS
        return None
    free = free_device_bytes(device)
    run = RunShape(
        max_length=max_length,
        budget=budget,
        micro_batch=micro_batch,
        gradient_checkpointing=gradient_checkpointing,
        reference=reference,
    )
    shape = model_shape(model)
    tokens, no_grad, room = auto_chunk_tokens(shape, ds_config, run, free)
    score.max_tokens_per_forward = tokens
    width = row_width(shape, max_length)
    row = f"{width}" if width == max_length else f"2 x {max_length} ([noised ; clean])"
    chosen = f"{tokens} tokens ({tokens // width} rows of {row}) per forward with gradients"
    if score.max_tokens_no_grad is None:
        score.max_tokens_no_grad = no_grad
        chosen += f", {no_grad} without"
    where = "GPU memory" if device.type == "cuda" else "RAM (CPU accelerator)"
    return (
        f"--max-tokens-per-forward auto: {chosen}, from the planner's activation formulas and "
        f"{free / 2**30:.1f} GiB free {where} ({max(room, 0) / 2**30:.1f} GiB for activations)"
    )
