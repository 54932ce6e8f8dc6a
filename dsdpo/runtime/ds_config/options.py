"""The batch, optimizer and schedule values of the DeepSpeed JSON filled from the training options
(train.learning_rate, ...), as Hugging Face's Trainer does (transformers' HfTrainerDeepSpeedConfig):
"auto" takes the option or a default, a number in the JSON and a given option is an error."""

from __future__ import annotations

import copy
import math
from typing import Any

from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config.json_file import AUTO

# Where the JSON says "auto" and the option is not given: the values ds_configs/rtx4080.json held
# before they became "auto", so the shipped configs train as they did without options.
AUTO_DEFAULTS = {
    "learning_rate": 5e-7,
    "weight_decay": 0.1,
    "lr_scheduler": "linear",
    "warmup_steps": 20,
    "per_device_batch_size": 1,
    "gradient_accumulation_steps": 16,
}
# With --lora-rank: only the adapters train, from zero (B = 0), so they take a rate ~100x a full
# fine-tune's and no weight decay (which would pull them back to the base model); rtx4080_lora.json's
# values before it said "auto".
LORA_AUTO_DEFAULTS = {**AUTO_DEFAULTS, "learning_rate": 5e-5, "weight_decay": 0.0}
# --lr-scheduler: the DeepSpeed scheduler of that shape after the warmup
LR_SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}
ADD_SCHEDULER = 'add "scheduler": {"type": "auto"}'
# The training option that fills each key (transformers' trainer_config_process pairs them the same way)
OPTION_KEYS = {
    "per_device_batch_size": "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "optimizer.params.lr",
    "weight_decay": "optimizer.params.weight_decay",
}


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')} (train.{name})"


def _fill(block: dict, key: str, dotted: str, option: str, given: Any, default: Any, source: str) -> None:
    """One key from its option: "auto" takes the option (else `default`, unless that is None), a
    missing key takes a given option, a number in the JSON and a given option is an error."""
    value = block.get(key)
    if value == AUTO:
        if given is not None or default is not None:
            block[key] = given if given is not None else default
    elif given is not None and key in block:
        raise DsdpoError(
            f"{source}: {dotted} is {value!r} and {_option(option)} {given!r} is given too: set it in one "
            'place (write "auto" in the JSON to take the option)'
        )
    elif given is not None:
        block[key] = given


def fill_training_options(
    config: dict[str, Any], options: Any, source: str, *, lora: bool = False
) -> dict[str, Any]:
    """A copy of the JSON with the batch, optimizer and scheduler "auto" values filled from the
    training options (`options`: dsdpo.config.TrainConfig; an option not given, or None: AUTO_DEFAULTS,
    LORA_AUTO_DEFAULTS for a LoRA run).
    The warmup and decay lengths wait for the run's length (resolve_ds_config). Batch "auto" keys are
    left to resolve_batch_sizes when the JSON fixes train_batch_size and no option is given."""
    filled = copy.deepcopy(config)
    fixed_total = filled.get("train_batch_size", AUTO) != AUTO
    for option, dotted in OPTION_KEYS.items():
        *path, key = dotted.split(".")
        block = filled
        for part in path:
            block = block.get(part)
            if not isinstance(block, dict):
                break
        if not isinstance(block, dict):
            continue  # no optimizer block: refused by resolve_ds_config
        batch = option in ("per_device_batch_size", "gradient_accumulation_steps")
        default = None if batch and fixed_total else (LORA_AUTO_DEFAULTS if lora else AUTO_DEFAULTS)[option]
        _fill(block, key, dotted, option, getattr(options, option, None), default, source)
    _fill_scheduler_type(filled, getattr(options, "lr_scheduler", None), source)
    return filled


def _fill_scheduler_type(config: dict[str, Any], given: str | None, source: str) -> None:
    """scheduler.type "auto": DeepSpeed's scheduler for --lr-scheduler, its parameters laid out for
    resolve_ds_config to fill. The JSON keeps the warmup's shape: "warmup_min_ratio" (the first step's
    rate over the peak; default 0, as Hugging Face's) and "warmup_type" ("linear" by default, as Hugging
    Face's; DeepSpeed's own default is "log")."""
    scheduler = config.get("scheduler")
    if not isinstance(scheduler, dict):
        if given is not None:
            raise DsdpoError(f"{source}: {_option('lr_scheduler')} needs a scheduler block: {ADD_SCHEDULER}")
        return
    if scheduler.get("type") != AUTO:
        if given is not None:
            raise DsdpoError(
                f"{source}: scheduler.type is {scheduler.get('type')!r} and {_option('lr_scheduler')} "
                f'{given!r} is given too: set it in one place (write "auto" in the JSON to take the option)'
            )
        return
    params = scheduler.get("params") or {}
    if not isinstance(params, dict):
        raise DsdpoError(f'{source}: "scheduler.params" must be a JSON object, got {params!r}')
    name = LR_SCHEDULERS[given or AUTO_DEFAULTS["lr_scheduler"]]
    start = params.pop("warmup_min_ratio", 0.0)
    lengths = {"warmup_num_steps": AUTO, "warmup_type": "linear"}
    if name == "WarmupCosineLR":  # a ratio of the optimizer's rate; HF's cosine ends at 0
        laid_out = {"total_num_steps": AUTO, "warmup_min_ratio": start, "cos_min_ratio": 0.0, **lengths}
    else:
        lr = _peak_lr(config)
        floor = start * lr if isinstance(lr, int | float) and not isinstance(lr, bool) else AUTO
        laid_out = {"warmup_min_lr": floor, "warmup_max_lr": AUTO, **lengths}
        if name == "WarmupDecayLR":
            laid_out["total_num_steps"] = AUTO
    scheduler["type"] = name
    scheduler["params"] = {**laid_out, **params}


def _peak_lr(config: dict[str, Any]) -> Any:
    params = (config.get("optimizer") or {}).get("params")
    return params.get("lr", AUTO) if isinstance(params, dict) else AUTO


def warmup_steps(options: Any, total_steps: int) -> int | None:
    """--warmup-steps, or --warmup-ratio as ceil(ratio × steps) (transformers'
    TrainingArguments.get_warmup_steps); None when neither is given."""
    if getattr(options, "warmup_steps", None) is not None:
        return options.warmup_steps
    if getattr(options, "warmup_ratio", None) is not None:
        return math.ceil(options.warmup_ratio * total_steps)
    return None


def fill_schedule_lengths(config: dict[str, Any], options: Any, total_steps: int, source: str) -> None:
    """The warmup, the peak and the decay length of the scheduler, now that the run's length is known.
    DeepSpeed refuses a warmup of 0 steps (and warms up over at least 2): 0 is passed as 1, as
    transformers does; a constant rate without warmup is no scheduler at all."""
    scheduler = config.get("scheduler")
    if not isinstance(scheduler, dict):
        if warmup_steps(options, total_steps) is not None:
            option = "warmup_steps" if options.warmup_steps is not None else "warmup_ratio"
            raise DsdpoError(f"{source}: {_option(option)} needs a scheduler block: {ADD_SCHEDULER}")
        return
    if scheduler.get("params") is None:
        scheduler["params"] = {}
    params = scheduler["params"]
    warmup = warmup_steps(options, total_steps)
    option = "warmup_steps" if getattr(options, "warmup_steps", None) is not None else "warmup_ratio"
    _fill(params, "warmup_num_steps", "scheduler.params.warmup_num_steps", option, warmup, None, source)
    if params.get("warmup_num_steps") == AUTO:
        params["warmup_num_steps"] = AUTO_DEFAULTS["warmup_steps"]
    if scheduler.get("type") == "WarmupLR" and params.get("warmup_num_steps") == 0:
        del config["scheduler"]
        return
    if isinstance(params.get("warmup_num_steps"), int):
        params["warmup_num_steps"] = max(1, params["warmup_num_steps"])
    if params.get("warmup_max_lr") == AUTO:
        params["warmup_max_lr"] = _peak_lr(config)
    if params.get("total_num_steps") == AUTO:
        params["total_num_steps"] = max(total_steps, 1)


def schedule_summary(config: dict[str, Any]) -> str:
    """The resolved learning rate and schedule in words, for the run's opening lines."""
    scheduler = config.get("scheduler") or {}
    shape = scheduler.get("type", "constant")
    warmup = (scheduler.get("params") or {}).get("warmup_num_steps")
    return f"learning rate {_peak_lr(config)} ({shape}" + (f", {warmup} warmup steps)" if warmup else ")")
