"""The policy engine's DeepSpeed config resolved from the JSON (checked, every "auto" the trainer
knows filled), and the reference engine's derived from it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config.deepspeed_schema import check_with_deepspeed
from dsdpo.runtime.ds_config.json_file import AUTO, precision, resolve_batch_sizes
from dsdpo.runtime.ds_config.nvme import PLANNED_NVME_PATH, fill_nvme_paths, fill_swap_buffer_size
from dsdpo.runtime.ds_config.options import fill_schedule_lengths, fill_training_options

log = logging.getLogger(__name__)

# Blocks dsdpo reads itself before DeepSpeed parses the file: they must be JSON objects.
OBJECT_BLOCKS = ("zero_optimization", "fp16", "bf16", "optimizer", "scheduler", "data_types")


def resolve_ds_config(
    config: dict[str, Any],
    *,
    world_size: int,
    total_steps: int,
    options: Any = None,
    nvme_path: str | None = None,
    largest_parameter: int | None = None,
    source: str = "DeepSpeed config",
    planning: bool = False,
    lora: bool = False,
) -> dict[str, Any]:
    """The policy engine's config: checked, with every "auto" the trainer knows filled in
    (`options`: the training options that fill batch, optimizer and schedule, None: AUTO_DEFAULTS;
    `largest_parameter`: elements of the model's largest parameter, for NVMe swap buffers; `lora`: a
    LoRA run, whose "auto" rate and decay default to LORA_AUTO_DEFAULTS).

    planning: for `dsdpo plan`, which starts no run: the same checks, but an NVMe folder is neither
    needed nor looked at (a placeholder stands for --nvme-path)."""
    for block in OBJECT_BLOCKS:
        if block in config and not isinstance(config[block], dict):
            raise DsdpoError(f'{source}: "{block}" must be a JSON object, got {config[block]!r}')
    resolved = fill_training_options(config, options, source, lora=lora)
    zero = resolved.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        raise DsdpoError(
            f"{source}: zero_optimization.stage must be 3 (dsdpo shards policy and reference with ZeRO-3), "
            f"got {zero.get('stage')!r}"
        )
    if resolved.get("fp16", {}).get("enabled"):
        raise DsdpoError(f"{source}: fp16 is not supported (it did not learn in tests); use bf16 or fp32")
    _warn_bf16_accumulation(resolved, source)
    if "optimizer" not in resolved:
        raise DsdpoError(f'{source}: an optimizer block is required, e.g. {{"type": "AdamW"}}')
    resolved.update(resolve_batch_sizes(resolved, world_size, source))
    # dsdpo owns the accumulation boundary: a micro-batch of pairs may take several backward calls.
    resolved["managed_gradient_accumulation"] = False
    fill_schedule_lengths(resolved, options, total_steps, source)
    if planning:
        nvme_path = nvme_path or PLANNED_NVME_PATH
    fill_nvme_paths(zero, nvme_path, source, "policy", check=not planning)
    fill_swap_buffer_size(zero, largest_parameter, world_size)
    leftover = [key for key, value in _walk(resolved) if value == AUTO]
    if leftover:
        raise DsdpoError(f'{source}: dsdpo cannot fill "auto" for {", ".join(leftover)}; set a value')
    resolved.setdefault("steps_per_print", 10**9)  # dsdpo logs progress itself
    check_with_deepspeed(resolved, source)
    return resolved


def _warn_bf16_accumulation(config: dict[str, Any], source: str) -> None:
    """Without data_types.grad_accum_dtype, ZeRO-3 adds each backward call's gradient into a bf16
    buffer: 16 micro-batches × 4 chunks lost ~1.5% of the gradient (tests/test_bf16_accumulation.py).
    A warning, not a silent fill: the file is the one place for precision, and fp32 costs 2 more
    bytes a parameter where the gradient partitions live (CPU RAM with an offloaded optimizer)."""
    if precision(config) == "bf16" and "grad_accum_dtype" not in (config.get("data_types") or {}):
        log.warning(
            "%s: bf16 without data_types.grad_accum_dtype: DeepSpeed accumulates gradients in bf16 "
            '(~1%% error over many micro-batches and chunks); add "data_types": {"grad_accum_dtype": "fp32"}',
            source,
        )


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
