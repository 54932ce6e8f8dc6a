"""In-process training runs of a tiny model on the synthetic addition preference (dsdpo.training.demo):
the set-up the run tests share (a DeepSpeed config, the data, the run's settings)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
from dsdpo.objective.loss_config import LossConfig
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.ds_helpers import CPU_CONFIG


def constant_lr_ds_config(
    folder: Path, name: str = "ds.json", *, micro: int | None = None, accumulation: int | None = None, lr=None
) -> Path:
    """ds_configs/cpu.json without its scheduler, written to folder/name: the learning rate applies from
    step 1, so the first step moves the policy. Batch sizes and the rate where given."""
    config = copy.deepcopy(CPU_CONFIG)
    config.pop("scheduler")
    if micro is not None:
        config["train_micro_batch_size_per_gpu"] = micro
    if accumulation is not None:
        config["gradient_accumulation_steps"] = accumulation
    if lr is not None:
        config["optimizer"]["params"]["lr"] = lr
    path = Path(folder) / name
    path.write_text(json.dumps(config))
    return path


def addition_data(folder: Path, count: int = 16, seed: int = 0) -> Path:
    """`count` pairs of the addition preference in folder/pairs.jsonl."""
    return write_jsonl(addition_pairs(count, seed=seed), Path(folder) / "pairs.jsonl")


def tiny_run_config(
    model_dir, data, output, *, model: dict | None = None, score: dict | None = None, loss=None, **train
) -> Config:
    """A run of the model at model_dir on data, written to output: budget 2 unless score says otherwise,
    `train`'s options as TrainConfig fields."""
    return Config(
        model=ModelConfig(path=str(model_dir), **(model or {})),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(**{"budget": 2, **(score or {})}),
        loss=loss or LossConfig(),
        train=TrainConfig(output=str(output), **train),
    )


def training_and_held_out_rows(folder: Path, held_out: int = 6) -> tuple[Path, list[dict]]:
    """folder/train.jsonl with 16 addition pairs (seed 1), and `held_out` other pairs (seed 2, ids
    "held-N" so that none is a training row), for the caller to shape and write."""
    train = write_jsonl(addition_pairs(16, seed=1), Path(folder) / "train.jsonl")
    return train, [{**row, "id": f"held-{row['id']}"} for row in addition_pairs(held_out, seed=2)]
