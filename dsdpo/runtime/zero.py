"""What dsdpo does with DeepSpeed's ZeRO-3 beyond building engines: gathering partitioned parameters
whole, an optimizer step's mechanics (apply it, throw it away, release memory after an out-of-memory
error) and the NVMe-swapped optimizer's gradient boundary.

Some of it reaches into DeepSpeed's internals (attributes that are not public API). Every such name is
read through `internal`, which stops the run with one line naming the version when a DeepSpeed release
renames it, never a `getattr(..., default)` that would silently do nothing; INTERNALS lists them all,
and tests/test_deepspeed_internals.py checks each on a real engine, so an upgrade that breaks one fails
a test before it misbehaves in a run.
"""

from __future__ import annotations

import gc

import deepspeed
import torch

from dsdpo.errors import DsdpoError

# Every DeepSpeed-internal name used below: on the ZeRO-3 optimizer (DeepSpeedZeroOptimizer_Stage3,
# deepspeed/runtime/zero/stage3.py, 0.19) unless marked.
INTERNALS = (
    "swap_optimizer",  # whether the optimizer state is swapped to NVMe
    "fp16_groups",  # the optimizer's sub-groups of parameters
    "ipg_buckets",  # the reduce buckets, each with clear_params()
    "params_already_reduced",  # parameter id -> reduced this step
    "_offload_boundary_param_ids",  # parameters whose gradients wait for the step's boundary
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "_offload_grad_partition_at_boundary",
    "_swap_out_offload_fp32_gradients",
)


def internal(obj, name: str):
    """An attribute of DeepSpeed's that is not public API: a clear stop when a version renames it."""
    if not hasattr(obj, name):
        raise DsdpoError(
            f"DeepSpeed {deepspeed.__version__}: {type(obj).__name__} has no {name.lstrip('_')!r}; dsdpo's "
            "step mechanics (dsdpo/runtime/zero.py) were written against DeepSpeed 0.19"
        )
    return getattr(obj, name)


def missing_internals(optimizer) -> list[str]:
    """The names of INTERNALS a ZeRO-3 optimizer lacks (none on the DeepSpeed dsdpo supports)."""
    return [name for name in INTERNALS if not hasattr(optimizer, name)]


def gathered(params, *, modifier_rank: int | None = None):
    """ZeRO-3 parameters whole inside the block; with modifier_rank, that rank's changes are kept
    (partitioned again on leaving)."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def is_engine(obj) -> bool:
    """Whether `obj` is a DeepSpeed engine: a reference of its own, not the policy with its adapters
    off (reference.interface.AdapterDisabledReference) or none."""
    return isinstance(obj, deepspeed.DeepSpeedEngine)


def apply_step(policy) -> bool:
    """The optimizer step of the gradient the step's backward calls accumulated; whether DeepSpeed
    applied it: it skips an update whose global gradient norm (all ranks) is not finite, as a finite
    loss can have an infinite gradient (a huge beta, a bf16 overflow in backward)."""
    finalize_swapped_gradients(policy)  # else DeepSpeed holds 4 bytes a parameter on the GPU here
    policy.step()
    return policy.was_step_applied()


def drop_step(policy) -> None:
    """Throw the step's accumulated gradient away: the next backward overwrites instead of adding."""
    policy.optimizer.zero_grad()


def release_memory(*engines) -> None:
    """Throw away the step's partial gradient and what ZeRO-3 had gathered, then collect (after a chunk
    ran out of device memory; engines: the policy first, then the reference's or None)."""
    for engine in engines:
        if is_engine(engine):
            engine.empty_partition_cache()  # release and reset every gathered parameter
    policy = engines[0]
    for param in policy.module.parameters():
        param.grad = None  # a backward cut short leaves some (zero_grad's record_stream fails on the CPU)
    optimizer = policy.optimizer
    # A backward cut short leaves gradients waiting in ZeRO-3's reduce buckets and marked as reduced;
    # DeepSpeed 0.19 clears them only at step().
    for bucket in internal(optimizer, "ipg_buckets").values():
        bucket.clear_params()
    reduced = internal(optimizer, "params_already_reduced")
    for key in reduced:
        reduced[key] = False
    drop_step(policy)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finalize_swapped_gradients(policy) -> None:
    """The gradient boundary of an optimizer whose state is swapped to NVMe, one optimizer sub-group
    at a time; call it before policy.step().

    With dsdpo's own accumulation boundary (managed_gradient_accumulation false), DeepSpeed 0.19's
    step() finalizes in stage3._finalize_offload_gradient_accumulation: it copies every gradient
    partition to the accelerator, casts it to fp32 and, for sub-groups swapped to NVMe, keeps every
    cast until one swap-out at the end: 4 bytes a parameter on the GPU (29.9 GiB for LLaDA-8B, which
    a 16 GB card cannot hold). The same calls in the same order, swapped out after each sub-group,
    hold one sub-group's casts at a time (as DeepSpeed's own managed path swaps out per bucket). The
    parameters done leave the boundary's list, so step()'s finalize has nothing left to do.
    """
    optimizer = policy.optimizer
    if not internal(optimizer, "swap_optimizer"):
        return
    pending = internal(optimizer, "_offload_boundary_param_ids")
    partitions = internal(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
    at_boundary = internal(optimizer, "_offload_grad_partition_at_boundary")
    swap_out = internal(optimizer, "_swap_out_offload_fp32_gradients")
    accelerator = deepspeed.get_accelerator()
    for sub_group in internal(optimizer, "fp16_groups"):
        casts: dict = {}
        offsets: dict = {}
        for param in sub_group:
            if param.ds_id not in pending or param.ds_id not in partitions:
                continue
            gradient = partitions[param.ds_id]
            if not accelerator.on_accelerator(gradient):
                gradient = gradient.to(accelerator.current_device_name(), non_blocking=True)
            at_boundary(param, gradient, casts, offsets)
        swap_out(casts, offsets)  # copies them into its pinned buffers: the casts can go
        pending.difference_update(param.ds_id for param in sub_group)
