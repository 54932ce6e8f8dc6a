"""Shared helpers for tests that run real DeepSpeed engines on the CPU accelerator."""

import copy
import json
from pathlib import Path

import deepspeed
import torch

from dsdpo.config import ModelConfig
from dsdpo.ds_config import resolve_ds_config
from dsdpo.engine import build_engines, init_distributed

CPU_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json").read_text())


def cpu_ds_config(micro: int = 1, accumulation: int = 1, **zero) -> dict:
    """ds_configs/cpu.json with batch sizes, a constant learning rate and no clipping, for tests.

    Adam with eps = 1 updates by lr·g/(|g| + 1) ≈ lr·g for the small gradients here: weights after a
    step are then a smooth function of the gradient, so comparing them compares gradients (with the
    usual eps, Adam's first step is lr·sign(g) and rounding noise in a zero gradient flips signs).
    """
    config = copy.deepcopy(CPU_CONFIG)
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation)
    config["optimizer"]["params"].update(lr=1.0, eps=1.0)
    config.pop("gradient_clipping")
    config.pop("scheduler")
    config["zero_optimization"].update(zero)
    return config


def engines_for(model_dir, ds_config: dict, **model_options):
    init_distributed()
    resolved = resolve_ds_config(ds_config, world_size=1, total_steps=10)
    return build_engines(ModelConfig(path=str(model_dir), **model_options), resolved)


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 engine, gathered whole."""
    weights = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone().float()
    return weights
