"""What training starts from (issue 19): a checkpoint as --model and --ref-model, as every other
command takes one; inputs that cannot train refused before DeepSpeed starts; the held-out sampler
resolved for the model and its chat setting compared with the pairs'."""

import json

import pytest

from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.cli_helpers import run
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

CPU = REPO / "ds_configs" / "cpu.json"  # train_batch_size 4 on one rank
SHOWN = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(addition_pairs(8, seed=1), tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tiny_gemma_dir, pairs_file, tmp_path_factory):
    """step_000001 of a one-step run from the tiny model."""
    output = tmp_path_factory.mktemp("first") / "run"
    result = run_train(train_args(CPU, tiny_gemma_dir, pairs_file, output, max_steps=1, budget=2, seed=1))
    assert result.returncode == 0, tail(result)
    return output / "step_000001"


def _first_step(model, pairs_file, output, *extra) -> dict:
    args = train_args(CPU, model, pairs_file, output, max_steps=1, budget=2, seed=2)
    result = run_train([*args, *extra])
    assert result.returncode == 0, tail(result)
    return {name: metrics_by_step(output)[1][name] for name in SHOWN}, result


def test_training_starts_from_a_checkpoint_as_from_its_export(checkpoint, pairs_file, tmp_path):
    """A step_NNNNNN folder as --model and --ref-model trains exactly as the Hugging Face folder
    `dsdpo export --dtype fp32` makes of it (tests/test_export.py: that folder scores as the policy)."""
    exported = tmp_path / "exported"
    assert run("export", checkpoint, exported, "--dtype", "fp32").exit_code == 0
    from_export, _ = _first_step(exported, pairs_file, tmp_path / "from-export")
    from_checkpoint, result = _first_step(
        checkpoint, pairs_file, tmp_path / "from-checkpoint", "--ref-model", checkpoint
    )
    assert from_checkpoint == pytest.approx(from_export, rel=1e-6, abs=1e-7)
    assert f"training starts from checkpoint {checkpoint}" in result.stdout + result.stderr
    assert "built successfully" not in result.stdout  # DeepSpeed's op came from the cache


def test_data_too_small_for_one_step_is_refused_before_anything_starts(pairs_file, tmp_path):
    """Refused when read, before the model folder is looked at (this one does not exist) or DeepSpeed
    starts (no process group, no output folder)."""
    small = write_jsonl(addition_pairs(3, seed=1), tmp_path / "small.jsonl")
    output = tmp_path / "run"
    result = run_train(train_args(CPU, tmp_path / "no-model", small, output))
    assert result.returncode == 2, tail(result)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {small}: 3 pairs make no optimizer step of 4 pairs (train_batch_size in {CPU})"
    )
    assert "Initializing TorchBackend" not in result.stdout + result.stderr
    assert not output.exists()


def test_held_out_sampler_follows_the_model_and_warns_of_other_prompts(tiny_gemma_dir, pairs_file, tmp_path):
    """Plain-text training pairs, held-out problems given with the tiny tokenizer's chat template (the
    rule): a warning; the sampler's settings as resolved are the run's record, the answers say chat;
    --pad-responses-to auto takes the resolved gen length."""
    problems = [
        {"question": row["prompt"], "answer": int(row["chosen"])} for row in addition_pairs(2, seed=3)
    ]
    problems_file = write_jsonl(problems, tmp_path / "problems.jsonl")
    output = tmp_path / "run"
    args = train_args(
        CPU, tiny_gemma_dir, pairs_file, output, max_steps=1, budget=2, eval_problems=problems_file,
        eval_gen_length=4, pad_responses_to="auto",
    )  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, tail(result)
    assert (
        "warning: the held-out problems" in result.stderr and "--no-eval-chat matches them" in result.stderr
    )
    saved = (output / "train_config.yaml").read_text()
    assert "eval_sampler:\n  gen_length: 4\n  block_length: 4\n  steps: 4\n" in saved
    assert "pad_responses_to: 4\n" in saved
    records = [json.loads(line) for line in (output / "eval_generations" / "step_000000.jsonl").open()]
    assert {record["chat"] for record in records} == {True}
