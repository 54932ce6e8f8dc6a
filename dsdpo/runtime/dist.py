"""Ranks, barriers and collectives: the one place that talks to torch.distributed.

Collectives run on the accelerator's device (DeepSpeed's accelerator: "cuda:N" on a GPU, "cpu" on
the CPU accelerator), because the process group's backend is chosen for it: NCCL reduces CUDA
tensors only and refuses CPU ones ("No backend type associated with device type cpu"), gloo takes
CPU tensors. Results come back to the CPU as Python floats.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launcher_rank_and_world() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, readable before the process group exists, so
    that bad input is reported before the slow distributed start-up. Plain python: (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    """The accelerator's current device: where the engines compute and the collectives run."""
    from deepspeed.accelerator import get_accelerator  # the accelerator DeepSpeed picked (DS_ACCELERATOR)

    return torch.device(get_accelerator().current_device_name())


def collective_tensor(values: list[float]) -> torch.Tensor:
    """The values as a float64 tensor on the collectives' device."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of each value over all ranks, in one collective (every rank must call it)."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = collective_tensor(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks, in one collective (every rank must call it)."""
    if world_size() == 1:
        return values
    tensor = collective_tensor(list(values.values()))
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world_size()).tolist(), strict=True))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
