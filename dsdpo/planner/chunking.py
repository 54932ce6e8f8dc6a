"""--max-tokens-per-forward auto, and what happens when a chunk runs out of device memory.

auto: the largest chunks (whole rows of --max-length tokens) whose activations, by the planner's
formulas (dsdpo/planner/memory.py, every response position masked: a bound), fit in 90% of the
device memory free when training starts, less the model states that come and go during the
forward and backward calls (gathered parameters, a module's gradients, reduce-scatter's copy of a
bucket). The same for the forwards without gradients, unless --max-tokens-no-grad is given. Unset
(the default) means auto on CUDA and 4096 elsewhere, as before.

Out of memory: chunking is exact (docs/design.md, "Exact gradients when the score is chunked"), so a
step whose chunk ran out of memory can be redone with smaller chunks and give the same gradient.
The gradient the step's earlier backward calls had accumulated is thrown away (the optimizer's
zero_grad, as for a non-finite step, and the gradients a backward cut short left in ZeRO-3's reduce
buckets), ZeRO-3's gathered parameters are released, and the step's
micro-batches run again with both chunk budgets halved. When every chunk already holds one row, a
row does not fit: the run stops with one line saying so.

GPU-only: the CUDA allocator's free memory and a real CUDA out-of-memory error are not seen on the
CPU; there the same code runs on the CPU's available RAM and on an injected torch.OutOfMemoryError.
With several ranks a rank that runs out of memory leaves the others waiting in a collective, so the
retry is for one rank only (a several-rank run stops with the error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from dsdpo.config import DEFAULT_TOKENS
from dsdpo.errors import DsdpoError
from dsdpo.planner.activations import activation_bytes, no_grad_activation_bytes, row_width
from dsdpo.planner.memory import RunShape
from dsdpo.planner.model_states import model_state_plan
from dsdpo.planner.shapes import ModelShape, model_shape
from dsdpo.planner.zero_settings import dtype_bytes
from dsdpo.runtime.zero import release_memory

log = logging.getLogger(__name__)
T = TypeVar("T")
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


def halve_chunks(score, widest_row: int) -> str:
    """Halve both chunk budgets (not below one row); raise when every chunk is one row already."""
    grad, no_grad = score.max_tokens_per_forward, score.no_grad_tokens
    if grad < 2 * widest_row and no_grad < 2 * widest_row:
        raise DsdpoError(
            f"out of device memory with one row of {widest_row} tokens per forward: a single row does "
            "not fit. Lower --max-length, keep gradient checkpointing on, or offload more "
            "(`dsdpo plan` shows where the memory goes)"
        )
    new_grad = grad // 2 if grad >= 2 * widest_row else grad
    new_no_grad = no_grad // 2 if no_grad >= 2 * widest_row else no_grad
    score.max_tokens_per_forward, score.max_tokens_no_grad = new_grad, new_no_grad
    return (
        f"out of device memory in a chunk: the step is redone with --max-tokens-per-forward {grad} -> "
        f"{new_grad} and --max-tokens-no-grad {no_grad} -> {new_no_grad} (chunking is exact)"
    )


def retry_on_out_of_memory(
    run: Callable[[], T], score, *, widest_row: int, engines: tuple, say: Callable[[str], None] = log.warning
) -> tuple[T, int]:
    """run() (the step's forward and backward calls), redone with halved chunks after an out-of-memory
    error (module docstring); returns its result and the number of retries."""
    retries = 0
    while True:
        try:
            return run(), retries
        except torch.OutOfMemoryError:
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                raise
        # Outside the except block: the traceback, and the chunk's tensors it holds, are gone.
        release_memory(*engines)
        say(halve_chunks(score, widest_row))
        retries += 1
