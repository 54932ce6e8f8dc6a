"""The DeepSpeed JSON checked against DeepSpeed's own schema before the slow start-up: its known keys,
its pydantic models, the optimizers and schedulers it builds."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from typing import Any

from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config.json_file import BATCH_FIELDS

# DeepSpeed's pydantic models by the top-level key they parse (their errors name the model).
MODEL_KEYS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
}
# Modules whose string constants are DeepSpeed's config keys (those absent in a version are skipped).
KEY_MODULES = (
    "deepspeed.runtime.constants",
    "deepspeed.runtime.swap_tensor.constants",
    "deepspeed.runtime.data_pipeline.constants",
    "deepspeed.runtime.model_checkpointing.constants",
    "deepspeed.profiling.constants",
    "deepspeed.autotuning.constants",
    "deepspeed.compile.constants",
    "deepspeed.comm.constants",
    "deepspeed.io.constants",
)


def check_with_deepspeed(config: dict[str, Any], source: str) -> None:
    """What DeepSpeed would refuse only after the slow start-up, refused now in one line: keys it
    does not know (a typo is otherwise ignored), values its own config models reject, optimizer and
    scheduler types it cannot build and scheduler parameters they do not take."""
    known = deepspeed_top_level_keys()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]!r}?" if close else "DeepSpeed would ignore it; remove it"
            raise DsdpoError(f"{source}: unknown key {key!r}: {hint}")
    _parse_with_deepspeed(config, source)
    _check_optimizer(config.get("optimizer") or {}, source)
    _check_scheduler(config.get("scheduler"), source)
    _check_non_negative(config, source)


def _check_non_negative(config: dict[str, Any], source: str) -> None:
    """Learning rates (the optimizer's and a scheduler's *_lr) and gradient_clipping are numbers >= 0:
    DeepSpeed takes gradient_clipping -1 silently and a negative rate fails only after start-up."""
    optimizer_params = (config.get("optimizer") or {}).get("params") or {}
    scheduler_params = (config.get("scheduler") or {}).get("params") or {}
    values = {
        f"scheduler.params.{key}": value for key, value in scheduler_params.items() if key.endswith("lr")
    }
    if "lr" in optimizer_params:
        values["optimizer.params.lr"] = optimizer_params["lr"]
    if "gradient_clipping" in config:
        values["gradient_clipping"] = config["gradient_clipping"]
    for name, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 0 <= value < math.inf:  # NaN fails the comparison too
            raise DsdpoError(f"{source}: {name} must be a finite number >= 0, got {value!r}")


class _RecordingDict(dict):
    """A dict that remembers the keys asked of it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.asked: set[str] = set()

    def get(self, key, *default):
        self.asked.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)


@functools.cache
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every key DeepSpeed reads at the top of its config: those its parser asks for (recorded while
    it parses a minimal config) and the string constants of its config-key modules."""
    from deepspeed.runtime.config import DeepSpeedConfig

    minimal = _RecordingDict({**dict.fromkeys(BATCH_FIELDS, 1), "zero_optimization": {"stage": 3}})
    DeepSpeedConfig(minimal)
    keys = minimal.asked | {"optimizer", "scheduler"}
    for name in KEY_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        keys |= {value for key, value in vars(module).items() if key.isupper() and isinstance(value, str)}
    return frozenset(keys)


def _parse_with_deepspeed(config: dict[str, Any], source: str) -> None:
    """DeepSpeed's own parser and pydantic models, on the batch of one rank (its world size is 1
    before the processes start; the batch triple was checked against the real one already)."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = {**config, "train_batch_size": config["train_micro_batch_size_per_gpu"]}
    one_rank["gradient_accumulation_steps"] = 1
    try:
        DeepSpeedConfig(one_rank)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in (MODEL_KEYS.get(err.title, err.title), *first["loc"]))
        raise DsdpoError(f"{source}: {where}: {first['msg']} (got {first.get('input')!r})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise DsdpoError(f"{source}: DeepSpeed rejects the config: {err}") from None


def _check_optimizer(optimizer: dict[str, Any], source: str) -> None:
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    name = optimizer.get("type")
    if not isinstance(name, str) or (
        name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, name)
    ):
        raise DsdpoError(
            f"{source}: optimizer.type {name!r} is not an optimizer DeepSpeed builds; use one of "
            f"{', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class name"
        )


def _check_scheduler(scheduler: dict[str, Any] | None, source: str) -> None:
    """The scheduler's type exists and its parameters are ones it takes, with numbers where it wants
    numbers (DeepSpeed would build it with them only after start-up)."""
    if scheduler is None:
        return
    import torch
    from deepspeed.runtime import lr_schedules

    name = str(scheduler.get("type"))
    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if not inspect.isclass(cls):
        raise DsdpoError(
            f"{source}: scheduler.type {name!r} is not a scheduler; use one of "
            f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a torch.optim.lr_scheduler class name"
        )
    accepted = inspect.signature(cls).parameters
    for key, value in (scheduler.get("params") or {}).items():
        if key not in accepted or key == "optimizer":
            raise DsdpoError(f"{source}: scheduler.params.{key}: {name} takes no such parameter")
        default = accepted[key].default
        wants_number = isinstance(default, int | float) and not isinstance(default, bool)
        if wants_number and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise DsdpoError(f"{source}: scheduler.params.{key} must be a number, got {value!r}")
