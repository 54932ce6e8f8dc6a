"""Typed training configuration: dataclasses that validate themselves and name the bad field.

A config comes from a YAML/JSON file with one section per dataclass (model, data, score, loss,
train, eval_sampler), then command-line overrides. DeepSpeed settings (ZeRO, offload, precision) are
not here: they live in the DeepSpeed JSON (see dsdpo/runtime/ds_config/). The batch, optimizer and schedule
options (train.learning_rate, ...) fill that JSON's "auto" values, as Hugging Face's Trainer does.

One module per section: model, data, score, sampler (eval_sampler), train; the loss section is
dsdpo.objective.loss_config. run holds the whole Config and the checks across sections, loading reads
it from a file and the command line; dsdpo.settings holds the `setting` helper every field is made with.
"""

from dsdpo.config.data import DataConfig
from dsdpo.config.loading import (
    apply_overrides,
    config_from_dict,
    load_config_file,
    parse_assignments,
)
from dsdpo.config.model import ModelConfig
from dsdpo.config.run import SECTIONS, Config
from dsdpo.config.sampler import (
    DEFAULT_BLOCK_LENGTH,
    DEFAULT_GEN_LENGTH,
    REMASKING,
    SamplerConfig,
    check_schedule,
)
from dsdpo.config.score import DEFAULT_TOKENS, ESTIMATORS, ScoreConfig
from dsdpo.config.train import KEEP_BEST_METRICS, TrainConfig
from dsdpo.objective.loss_config import LossConfig
from dsdpo.settings import setting

__all__ = [
    "DEFAULT_BLOCK_LENGTH",
    "DEFAULT_GEN_LENGTH",
    "DEFAULT_TOKENS",
    "ESTIMATORS",
    "KEEP_BEST_METRICS",
    "REMASKING",
    "SECTIONS",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "SamplerConfig",
    "ScoreConfig",
    "TrainConfig",
    "apply_overrides",
    "check_schedule",
    "config_from_dict",
    "load_config_file",
    "parse_assignments",
    "setting",
]
