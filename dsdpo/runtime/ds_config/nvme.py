"""NVMe offload in the DeepSpeed JSON: each engine's swap folder (--nvme-path, checked before any
start-up) and the parameter swap buffer's size."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config.json_file import AUTO

PLANNED_NVME_PATH = "/nvme"  # stands for --nvme-path in a plan (never created or written)


def fill_nvme_paths(zero: dict, nvme_path: str | None, source: str, role: str, *, check: bool = True) -> None:
    for block in ("offload_param", "offload_optimizer"):
        offload = zero.get(block) or {}
        if offload.get("device") != "nvme":
            continue
        path = offload.get("nvme_path", AUTO)
        if path == AUTO:
            if nvme_path is None:
                raise DsdpoError(
                    f"{source}: zero_optimization.{block} offloads to NVMe: give --nvme-path DIR"
                )
            path = nvme_path
        if check:
            _check_swap_folder(Path(path), source, block)
        # Each engine needs its own folder: a swapper empties its folder when it starts.
        offload["nvme_path"] = str(Path(path) / role)


def fill_swap_buffer_size(zero: dict, largest_parameter: int | None, world_size: int) -> None:
    """offload_param.buffer_size "auto": the largest parameter's partition. DeepSpeed swaps each
    parameter partition through one buffer and asserts it fits ("More elements ... than buffer size",
    partitioned_param_swapper.AsyncPartitionedParameterSwapper.get_buffer); it aligns the buffers
    to its aio blocks itself (_io_aligned_numel)."""
    offload = zero.get("offload_param") or {}
    if offload.get("buffer_size") == AUTO and largest_parameter is not None:
        offload["buffer_size"] = -(-largest_parameter // world_size)


def _check_swap_folder(folder: Path, source: str, block: str) -> None:
    """An existing, writable folder: a missing one is more often an unmounted drive than a wish to
    swap to the system disk, so it is not created."""
    problem = None
    if not folder.exists():
        problem = "does not exist (is the drive mounted?); create it"
    elif not folder.is_dir():
        problem = "is a file, not a folder"
    else:
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            problem = f"is not writable ({err.strerror})"
    if problem:
        raise DsdpoError(f"{source}: zero_optimization.{block} swaps to NVMe: {folder} {problem}")
