"""Precomputed reference scores train exactly like a reference engine, with no reference in memory."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dsdpo.cli import main
from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
from dsdpo.demo import addition_pairs, write_jsonl
from dsdpo.errors import DsdpoError
from dsdpo.loss import LossConfig
from dsdpo.train import train
from tests.ds_helpers import CPU_CONFIG
from tests.run_helpers import metrics_by_step

STEPS = 10  # 8 steps an epoch: the run crosses into epoch 1, whose draws differ


@pytest.fixture(scope="module")
def setup(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    data = write_jsonl(addition_pairs(16, seed=5), folder / "pairs.jsonl")
    ds = copy.deepcopy(CPU_CONFIG)
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    (folder / "ds.json").write_text(json.dumps(ds))
    return folder, data


def _precompute(model_dir, data, out, *options):
    result = CliRunner().invoke(
        main,
        [
            "precompute-reference",
            "--ref",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--seed",
            "3",
            "--no-progress",
            *options,
        ],
    )
    return result


def _train(model_dir, folder, data, output, *, reference_scores=None, budget=4):
    config = Config(
        model=ModelConfig(path=str(model_dir), reference_scores=reference_scores and str(reference_scores)),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(budget=budget),
        loss=LossConfig(beta=0.5),
        train=TrainConfig(output=str(output), max_steps=STEPS, epochs=2, seed=3),
    )
    return train(config, folder / "ds.json")


def test_precomputed_reference_trains_like_the_reference_engine(tiny_gemma_dir, setup):
    folder, data = setup
    result = _precompute(tiny_gemma_dir, data, folder / "ref.safetensors", "--budget", "4", "--epochs", "2")
    assert result.exit_code == 0, result.output
    _train(tiny_gemma_dir, folder, data, folder / "engine")
    _train(tiny_gemma_dir, folder, data, folder / "precomputed", reference_scores=folder / "ref.safetensors")
    engine, precomputed = metrics_by_step(folder / "engine"), metrics_by_step(folder / "precomputed")
    assert precomputed[1]["loss"] == pytest.approx(0.693147, abs=1e-6)  # same masks: margin 0 at start
    for step in range(1, STEPS + 1):
        assert precomputed[step]["loss"] == pytest.approx(engine[step]["loss"], abs=1e-5), step
        assert precomputed[step]["sweeps"] == engine[step]["sweeps"] - 1  # no reference forward
    a = get_fp32_state_dict_from_zero_checkpoint(str(folder / "engine"))
    b = get_fp32_state_dict_from_zero_checkpoint(str(folder / "precomputed"))
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budget", "2", "--epochs", "2"], r"computed with other settings: budget 2 \(training: 4\)"),
        (["--budget", "4", "--epochs", "1"], "covers 1 epochs, training needs 2: precompute with --epochs 2"),
        (["--budget", "4", "--epochs", "2", "--max-length", "512"], r"max_length 512 \(training: 1024\)"),
    ],
)
def test_scores_made_for_another_run_are_refused_naming_the_difference(
    tiny_gemma_dir, setup, tmp_path, options, message
):
    folder, data = setup
    assert _precompute(tiny_gemma_dir, data, tmp_path / "ref.safetensors", *options).exit_code == 0
    with pytest.raises(DsdpoError, match=message):
        _train(tiny_gemma_dir, folder, data, tmp_path / "run", reference_scores=tmp_path / "ref.safetensors")


def test_a_file_that_is_not_a_scores_file_is_a_clear_error(tiny_gemma_dir, setup, tmp_path):
    folder, data = setup
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DsdpoError, match="not a dsdpo reference-scores file"):
        _train(tiny_gemma_dir, folder, data, tmp_path / "run", reference_scores=tmp_path / "junk.safetensors")
