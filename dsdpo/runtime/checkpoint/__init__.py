"""Sharded checkpoints that a crash cannot corrupt, and exact resume.

layout (the folder's files, atomic writes, digests), finding (complete checkpoints, `latest`,
--resume, the checks before any shard is read), retention (`best`, pruning to --keep-last),
save_load (the run's state saved and loaded), universal (DeepSpeed's any-world-size format),
weights (a checkpoint's weights read one tensor at a time, for loading and export).
"""

from dsdpo.runtime.checkpoint.finding import (
    check_checkpoint,
    complete_checkpoints,
    find_resume_checkpoint,
    is_checkpoint,
    latest_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from dsdpo.runtime.checkpoint.layout import (
    BEST_FILE,
    LATEST_FILE,
    PARTIAL_SUFFIX,
    STATE_FILE,
    STEP_PATTERN,
    file_digests,
    step_tag,
)
from dsdpo.runtime.checkpoint.retention import best_checkpoint_name, prune_checkpoints, write_best
from dsdpo.runtime.checkpoint.save_load import (
    TrainState,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from dsdpo.runtime.checkpoint.universal import convert_to_universal, is_universal
from dsdpo.runtime.checkpoint.weights import ADAPTER_CONFIG, cast_weight, weight_sources

__all__ = [
    "ADAPTER_CONFIG",
    "BEST_FILE",
    "LATEST_FILE",
    "PARTIAL_SUFFIX",
    "STATE_FILE",
    "STEP_PATTERN",
    "TrainState",
    "best_checkpoint_name",
    "cast_weight",
    "check_checkpoint",
    "complete_checkpoints",
    "config_differences",
    "convert_to_universal",
    "file_digests",
    "find_resume_checkpoint",
    "is_checkpoint",
    "is_universal",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_tag",
    "verify_checkpoint",
    "weight_sources",
    "write_best",
]
