"""DeepSpeed JSON configs: read, check, fill in what the trainer knows, derive the reference's.

The JSON file is the one place for ZeRO, offload and precision settings; this package never invents
them. It fills "auto" values from facts it knows (world size, steps in the run, the NVMe path given
on the command line) and, as Hugging Face's Trainer does (transformers' HfTrainerDeepSpeedConfig),
the batch, optimizer and schedule values from the training options (fill_training_options); it
rejects what dsdpo cannot run.

json_file (reading, precision, the batch triple), options (the training options' values), nvme (swap
folders and buffers), deepspeed_schema (DeepSpeed's own checks; the one module here that imports it),
resolve (the policy's config from all of them, the reference's from the policy's).
"""

from dsdpo.runtime.ds_config.deepspeed_schema import check_with_deepspeed, deepspeed_top_level_keys
from dsdpo.runtime.ds_config.json_file import (
    AUTO,
    BATCH_FIELDS,
    precision,
    read_ds_config,
    resolve_batch_sizes,
)
from dsdpo.runtime.ds_config.nvme import fill_swap_buffer_size
from dsdpo.runtime.ds_config.options import (
    AUTO_DEFAULTS,
    LORA_AUTO_DEFAULTS,
    LR_SCHEDULERS,
    fill_training_options,
    schedule_summary,
    warmup_steps,
)
from dsdpo.runtime.ds_config.resolve import reference_ds_config, resolve_ds_config

__all__ = [
    "AUTO",
    "AUTO_DEFAULTS",
    "BATCH_FIELDS",
    "LORA_AUTO_DEFAULTS",
    "LR_SCHEDULERS",
    "check_with_deepspeed",
    "deepspeed_top_level_keys",
    "fill_swap_buffer_size",
    "fill_training_options",
    "precision",
    "read_ds_config",
    "reference_ds_config",
    "resolve_batch_sizes",
    "resolve_ds_config",
    "schedule_summary",
    "warmup_steps",
]
