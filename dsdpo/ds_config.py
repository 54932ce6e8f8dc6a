"""DeepSpeed JSON configs: read, check, fill in what the trainer knows, derive the reference's.

The JSON file is the one place for ZeRO, offload, precision, batch and optimizer settings; this
module never invents them. It fills "auto" values from facts it knows (world size, steps in the
run, the NVMe path given on the command line) and rejects what dsdpo cannot run.

Batch arithmetic, in preference *pairs*:
    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size
One optimizer step always consumes train_batch_size pairs, however the scorer chunks its draws.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dsdpo.errors import DsdpoError

AUTO = "auto"
BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such DeepSpeed config file")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DsdpoError(f"{file}: not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(config, dict):
        raise DsdpoError(f"{file}: expected a JSON object")
    return config


def precision(config: dict[str, Any]) -> str:
    """What the engines compute in: "bf16" when that section is enabled, else "fp32" (fp16 is
    refused by resolve_ds_config)."""
    return "bf16" if config.get("bf16", {}).get("enabled") else "fp32"


def _positive_int(config: dict, name: str, source: str) -> int | None:
    value = config.get(name, AUTO)
    if value == AUTO:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DsdpoError(f'{source}: {name} must be a positive integer or "auto", got {value!r}')
    return value


def resolve_batch_sizes(config: dict, world_size: int, source: str) -> dict[str, int]:
    """Fill the "auto" batch fields; an inconsistent triple is an error naming all three."""
    total, micro, accumulation = (_positive_int(config, name, source) for name in BATCH_FIELDS)
    micro = micro or (total // (accumulation * world_size) if total and accumulation else 1)
    if accumulation is None:
        accumulation = total // (micro * world_size) if total else 1
    if total is None:
        total = micro * accumulation * world_size
    if micro < 1 or accumulation < 1 or total != micro * accumulation * world_size:
        raise DsdpoError(
            f"{source}: inconsistent batch sizes: train_batch_size ({total}) must equal "
            f"train_micro_batch_size_per_gpu ({micro}) × gradient_accumulation_steps ({accumulation}) "
            f"× world size ({world_size})"
        )
    return dict(zip(BATCH_FIELDS, (total, micro, accumulation), strict=True))


def _fill_nvme_paths(zero: dict, nvme_path: str | None, source: str, role: str) -> None:
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
        # Each engine needs its own folder: a swapper empties its folder when it starts.
        offload["nvme_path"] = str(Path(path) / role)


def resolve_ds_config(
    config: dict[str, Any],
    *,
    world_size: int,
    total_steps: int,
    nvme_path: str | None = None,
    source: str = "DeepSpeed config",
) -> dict[str, Any]:
    """The policy engine's config: checked, with every "auto" the trainer knows filled in."""
    resolved = copy.deepcopy(config)
    zero = resolved.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        raise DsdpoError(
            f"{source}: zero_optimization.stage must be 3 (dsdpo shards policy and reference with ZeRO-3), "
            f"got {zero.get('stage')!r}"
        )
    if resolved.get("fp16", {}).get("enabled"):
        raise DsdpoError(f"{source}: fp16 is not supported (it did not learn in tests); use bf16 or fp32")
    if "optimizer" not in resolved:
        raise DsdpoError(f'{source}: an optimizer block is required, e.g. {{"type": "AdamW"}}')
    resolved.update(resolve_batch_sizes(resolved, world_size, source))
    # dsdpo owns the accumulation boundary: a micro-batch of pairs may take several backward calls.
    resolved["managed_gradient_accumulation"] = False
    scheduler_params = (resolved.get("scheduler") or {}).get("params") or {}
    if scheduler_params.get("total_num_steps") == AUTO:
        scheduler_params["total_num_steps"] = max(total_steps, 1)
    _fill_nvme_paths(zero, nvme_path, source, "policy")
    leftover = [key for key, value in _walk(resolved) if value == AUTO]
    if leftover:
        raise DsdpoError(f'{source}: dsdpo cannot fill "auto" for {", ".join(leftover)}; set a value')
    resolved.setdefault("steps_per_print", 10**9)  # dsdpo logs progress itself
    return resolved


def reference_ds_config(policy_config: dict[str, Any], nvme_path: str | None = None) -> dict[str, Any]:
    """The frozen reference's engine: same ZeRO-3 and precision, no optimizer, no scheduler."""
    reference = copy.deepcopy(policy_config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "managed_gradient_accumulation"):
        reference.pop(key, None)
    zero = reference["zero_optimization"]
    zero.pop("offload_optimizer", None)
    offload = zero.get("offload_param") or {}
    if offload.get("device") == "nvme":
        offload["nvme_path"] = str(Path(offload["nvme_path"]).parent / "reference")
    return reference


def _walk(node: Any, prefix: str = ""):
    """(dotted key, value) for every leaf of nested dicts."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node
