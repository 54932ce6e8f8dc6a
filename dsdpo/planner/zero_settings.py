"""ZeRO-3's settings that size DeepSpeed's allocations, and the sizes it rounds them to.

The settings are read from a DeepSpeed config, raw or resolved, with DeepSpeed 0.19's defaults; the
rounding is that of its optimizer sub-groups, of torch's pinned host buffers and of aio's blocks.
dsdpo.planner.model_states sizes each allocation from them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from dsdpo.runtime.ds_config import fill_swap_buffer_size

ACCUMULATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # data_types.grad_accum_dtype


def dtype_bytes(ds_config: dict) -> int:
    return 2 if (ds_config.get("bf16") or {}).get("enabled") else 4


def _offload(zero: dict, block: str) -> str:
    return (zero.get(block) or {}).get("device") or "none"


def _number(value, default: float) -> float:
    return default if value in (None, "auto") else float(value)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 settings that size allocations, with DeepSpeed 0.19's defaults
    (deepspeed/runtime/zero/config.py, offload_config.py)."""

    params: str  # where parameters are offloaded: none | cpu | nvme
    optimizer: str
    persistence_threshold: float
    prefetch: float
    max_live: float
    max_reuse: float
    reduce_bucket: float
    contiguous_gradients: bool
    sub_group_size: float
    pin_params: bool
    pin_optimizer: bool
    param_buffer_count: float
    param_buffer_size: float
    max_in_cpu: float
    optimizer_buffer_count: float
    aio_alignment: int  # bytes: AIO_ALIGNED_BYTES x intra_op_parallelism (swap_tensor/utils.py)
    accumulation_bytes: (
        int  # of the gradient accumulation buffer: data_types.grad_accum_dtype, else the model's
    )

    @classmethod
    def of(cls, ds_config: dict, *, largest_parameter: int, world_size: int) -> ZeroSettings:
        """From a DeepSpeed config, raw or resolved ("auto" swap buffers sized as training sizes them)."""
        zero = copy.deepcopy(ds_config.get("zero_optimization") or {})
        fill_swap_buffer_size(zero, largest_parameter, world_size)
        param, optimizer = zero.get("offload_param") or {}, zero.get("offload_optimizer") or {}
        return cls(
            params=_offload(zero, "offload_param"),
            optimizer=_offload(zero, "offload_optimizer"),
            persistence_threshold=_number(zero.get("stage3_param_persistence_threshold"), 1e5),
            prefetch=_number(zero.get("stage3_prefetch_bucket_size"), 5e7),
            max_live=_number(zero.get("stage3_max_live_parameters"), 1e9),
            max_reuse=_number(zero.get("stage3_max_reuse_distance"), 1e9),
            reduce_bucket=_number(zero.get("reduce_bucket_size"), 5e8),
            contiguous_gradients=zero.get("contiguous_gradients", True),
            sub_group_size=_number(zero.get("sub_group_size"), 1e9),
            pin_params=bool(param.get("pin_memory", False)),
            pin_optimizer=bool(optimizer.get("pin_memory", False)),
            param_buffer_count=_number(param.get("buffer_count"), 5),
            param_buffer_size=_number(param.get("buffer_size"), 1e8),
            max_in_cpu=_number(param.get("max_in_cpu"), 1e9),
            optimizer_buffer_count=_number(optimizer.get("buffer_count"), 4),
            aio_alignment=1024 * int((ds_config.get("aio") or {}).get("intra_op_parallelism", 1)),
            accumulation_bytes=ACCUMULATION_BYTES.get(
                (ds_config.get("data_types") or {}).get("grad_accum_dtype"), dtype_bytes(ds_config)
            ),
        )


def sub_group_members(partitions: list[int], sub_group_size: float) -> list[list[int]]:
    """The parameter partitions of each optimizer sub-group: parameters in order until a group
    reaches sub_group_size (stage3.DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups)."""
    if sub_group_size >= sum(partitions):
        return [list(partitions)]
    groups, current = [], []
    for numel in partitions:
        current.append(numel)
        if sum(current) >= sub_group_size:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


def sub_groups(partitions: list[int], sub_group_size: float) -> list[int]:
    """Elements of each optimizer sub-group."""
    return [sum(group) for group in sub_group_members(partitions, sub_group_size)]


def pinned(nbytes: float, accelerator: str) -> float:
    """Bytes a torch-pinned host buffer holds: on CUDA torch's CachingHostAllocator rounds each
    allocation up to a power of two (ATen/core/CachingHostAllocator.h, "Round up the allocation to
    the nearest power of two"), DeepSpeed's default pinning path (DS_PIN_MEMORY_BACKEND=torch,
    utils/pin_memory.py; its "native" backend does not round, not modelled). DeepSpeed's CPU
    accelerator pins nothing (cpu_accelerator.pin_memory)."""
    if accelerator != "cuda" or nbytes <= 0:
        return nbytes
    return float(2 ** math.ceil(math.log2(nbytes)))


def aligned(numel: float, element: int, alignment: int) -> float:
    """numel rounded up to whole aio blocks (swap_tensor's _io_aligned_numel)."""
    step = alignment // element
    return math.ceil(numel / step) * step
