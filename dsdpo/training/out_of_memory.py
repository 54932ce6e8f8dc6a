"""A step whose chunk runs out of device memory, redone with smaller chunks.

Chunking is exact (docs/design.md, "Exact gradients when the score is chunked"), so a step whose
chunk ran out of memory can be redone with smaller chunks and give the same gradient. The gradient
the step's earlier backward calls had accumulated is thrown away (the optimizer's zero_grad, as for
a non-finite step, and the gradients a backward cut short left in ZeRO-3's reduce buckets), ZeRO-3's
gathered parameters are released (dsdpo.runtime.zero.release_memory), and the step's micro-batches
run again with both chunk budgets halved. When every chunk already holds one row, a
row does not fit: the run stops with one line saying so.

A real CUDA out-of-memory error is not seen on the CPU; there the same code runs on an injected
torch.OutOfMemoryError. With several ranks a rank that runs out of memory leaves the others waiting
in a collective, so the retry is for one rank only (a several-rank run stops with the error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from dsdpo.errors import DsdpoError
from dsdpo.runtime.zero import release_memory

log = logging.getLogger(__name__)
T = TypeVar("T")


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
