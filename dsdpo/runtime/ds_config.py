"""DeepSpeed JSON configs: read, check, fill in what the trainer knows, derive the reference's.

The JSON file is the one place for ZeRO, offload and precision settings; this module never invents
them. It fills "auto" values from facts it knows (world size, steps in the run, the NVMe path given
on the command line) and, as Hugging Face's Trainer does (transformers' HfTrainerDeepSpeedConfig),
the batch, optimizer and schedule values from the training options (fill_training_options); it
rejects what dsdpo cannot run.

Batch arithmetic, in preference *pairs*:
    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size
One optimizer step always consumes train_batch_size pairs, however the scorer chunks its draws.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from dsdpo.errors import DsdpoError

log = logging.getLogger(__name__)

AUTO = "auto"
PLANNED_NVME_PATH = "/nvme"  # stands for --nvme-path in a plan (never created or written)
BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
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
# Blocks dsdpo reads itself before DeepSpeed parses the file: they must be JSON objects.
OBJECT_BLOCKS = ("zero_optimization", "fp16", "bf16", "optimizer", "scheduler", "data_types")
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


def _fill_nvme_paths(
    zero: dict, nvme_path: str | None, source: str, role: str, *, check: bool = True
) -> None:
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


def _fill_schedule_lengths(config: dict[str, Any], options: Any, total_steps: int, source: str) -> None:
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
    _fill_schedule_lengths(resolved, options, total_steps, source)
    if planning:
        nvme_path = nvme_path or PLANNED_NVME_PATH
    _fill_nvme_paths(zero, nvme_path, source, "policy", check=not planning)
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
