"""Precomputed reference scores train exactly like a reference engine, with no reference in memory."""

import copy
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file

from dsdpo.cli import main
from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
from dsdpo.errors import DsdpoError
from dsdpo.models.loading import load_tokenizer
from dsdpo.objective.losses import LossConfig
from dsdpo.training.demo import addition_pairs, write_jsonl
from dsdpo.training.loop import train
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


def _train(model_dir, folder, data, output, *, reference_scores=None, budget=4, ds_config=None):
    config = Config(
        model=ModelConfig(path=str(model_dir), reference_scores=reference_scores and str(reference_scores)),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(budget=budget),
        loss=LossConfig(beta=0.5),
        train=TrainConfig(output=str(output), max_steps=STEPS, epochs=2, seed=3),
    )
    return train(config, ds_config or folder / "ds.json")


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


def test_fp32_scores_are_refused_for_a_bf16_run(tiny_gemma_dir, setup, tmp_path):
    folder, data = setup
    assert (
        _precompute(
            tiny_gemma_dir, data, tmp_path / "ref.safetensors", "--budget", "4", "--epochs", "2"
        ).exit_code
        == 0
    )
    bf16 = {**json.loads((folder / "ds.json").read_text()), "bf16": {"enabled": True}}
    (tmp_path / "bf16.json").write_text(json.dumps(bf16))
    with pytest.raises(DsdpoError, match=r"dtype 'fp32' \(training: 'bf16'\)"):
        _train(
            tiny_gemma_dir,
            folder,
            data,
            tmp_path / "run",
            reference_scores=tmp_path / "ref.safetensors",
            ds_config=tmp_path / "bf16.json",
        )


def test_scores_of_another_chat_template_are_refused(tiny_gemma_dir, setup, tmp_path):
    folder, data = setup
    other = shutil.copytree(tiny_gemma_dir, tmp_path / "other-template")
    tokenizer = load_tokenizer(other)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(other)
    assert (
        _precompute(other, data, tmp_path / "ref.safetensors", "--budget", "4", "--epochs", "2").exit_code
        == 0
    )
    with pytest.raises(DsdpoError, match="another tokenizer or chat template"):
        _train(tiny_gemma_dir, folder, data, tmp_path / "run", reference_scores=tmp_path / "ref.safetensors")


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ("{digit}", r"e\.g\. id 'add-3' \(its text changed\)"),  # same length, other token
        ("{digit} ok", r"id 'add-3' \(its responses are now \d+ and \d+ tokens, scored at \d+ and \d+\)"),
    ],
    ids=["same-length", "longer"],
)
def test_scores_of_a_data_file_edited_since_are_refused(tiny_gemma_dir, setup, tmp_path, chosen, message):
    folder, data = setup
    assert (
        _precompute(
            tiny_gemma_dir, data, tmp_path / "ref.safetensors", "--budget", "4", "--epochs", "2"
        ).exit_code
        == 0
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    last = rows[3]["chosen"][-1]
    rows[3]["chosen"] = rows[3]["chosen"][:-1] + chosen.format(digit="1" if last != "1" else "2")
    edited = write_jsonl(rows, tmp_path / "pairs.jsonl")  # same ids, same count
    with pytest.raises(DsdpoError, match=message):
        _train(
            tiny_gemma_dir, folder, edited, tmp_path / "run", reference_scores=tmp_path / "ref.safetensors"
        )


def test_a_scores_file_without_the_records_is_refused(tiny_gemma_dir, setup, tmp_path):
    folder, data = setup
    settings = dict(
        estimator="l_over_L", budget=4, steps=None, seed=3, max_length=1024, max_prompt_length=None
    )
    meta = {"settings": settings, "ids": [], "epochs": 2, "dsdpo_version": "0.1.0"}  # an older file's
    old = tmp_path / "old.safetensors"
    save_file({"terms": torch.zeros(2, 0, 2, 4)}, str(old), {"dsdpo": json.dumps(meta)})
    with pytest.raises(DsdpoError, match=r"dsdpo 0\.1\.0, which did not record the precision, tokenizer"):
        _train(tiny_gemma_dir, folder, data, tmp_path / "run", reference_scores=old)


def _train_with_held_out(model_dir, folder, data, held_out, output, reference_scores=None):
    config = Config(
        model=ModelConfig(path=str(model_dir), reference_scores=reference_scores and str(reference_scores)),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(budget=4),
        loss=LossConfig(beta=0.5),
        train=TrainConfig(output=str(output), max_steps=2, seed=3, eval_data=str(held_out), eval_every=2),
    )
    return train(config, folder / "ds.json")


def test_held_out_evaluation_uses_the_precomputed_reference(tiny_gemma_dir, setup, tmp_path):
    """Issue 20: with --reference-scores, eval/* were reference-free, silently. Scores of the training
    and held-out rows together give the held-out numbers of a reference engine; scores without the
    held-out rows are refused."""
    folder, data = setup
    held = [{**row, "id": f"held-{row['id']}"} for row in addition_pairs(4, seed=6)]
    held_out = write_jsonl(held, tmp_path / "held.jsonl")
    both = write_jsonl(
        [json.loads(line) for line in data.read_text().splitlines()] + held, tmp_path / "all.jsonl"
    )
    assert _precompute(tiny_gemma_dir, both, tmp_path / "ref.safetensors", "--budget", "4").exit_code == 0
    _train_with_held_out(tiny_gemma_dir, folder, data, held_out, tmp_path / "engine")
    _train_with_held_out(
        tiny_gemma_dir, folder, data, held_out, tmp_path / "precomputed", tmp_path / "ref.safetensors"
    )
    engine, precomputed = metrics_by_step(tmp_path / "engine"), metrics_by_step(tmp_path / "precomputed")
    for step in (0, 2):
        for name in ("eval/loss", "eval/rewards/margins", "eval/rewards/chosen"):
            assert precomputed[step][name] == pytest.approx(engine[step][name], abs=1e-5), (step, name)
    assert precomputed[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert (
        _precompute(tiny_gemma_dir, data, tmp_path / "train_only.safetensors", "--budget", "4").exit_code == 0
    )
    with pytest.raises(
        DsdpoError, match=r"has no scores for 4 held-out pairs of .*held\.jsonl, e.g. id 'held-"
    ):
        _train_with_held_out(
            tiny_gemma_dir, folder, data, held_out, tmp_path / "refused", tmp_path / "train_only.safetensors"
        )
