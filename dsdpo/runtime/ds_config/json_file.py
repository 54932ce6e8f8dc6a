"""The DeepSpeed JSON as dsdpo reads it: the file, "auto", the precision, the batch triple.

Batch arithmetic, in preference *pairs*:
    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size
One optimizer step always consumes train_batch_size pairs, however the scorer chunks its draws.
"""

from __future__ import annotations

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
