"""--eval-data / --eval-every: held-out metrics logged during training equal `dsdpo eval preference`
of the saved policy against its start, computed afterwards by a separate code path."""

import json

import pytest

from dsdpo.training.demo import write_jsonl
from tests.cli_helpers import run
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args, train_on_cpu
from tests.tiny_runs import training_and_held_out_rows

OPTIONS = dict(budget=4, beta=0.5, seed=3)


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    train, held_out = training_and_held_out_rows(folder)
    eval_file = write_jsonl(held_out, folder / "eval.jsonl")
    train_on_cpu(
        tiny_gemma_dir, train, folder / "run", epochs=2, eval_data=eval_file, eval_every=3, **OPTIONS
    )
    return folder, eval_file


def test_eval_is_logged_at_the_start_every_n_steps_and_at_the_end(trained):
    folder, _ = trained
    metrics = metrics_by_step(folder / "run")
    evaluated = sorted(step for step, record in metrics.items() if "eval/loss" in record)
    assert evaluated == [0, 3, 6, 8]  # 16 pairs / 4 per step × 2 epochs = 8 steps
    assert metrics[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-6)  # policy = reference
    assert metrics[8]["eval/rewards/margins"] != metrics[3]["eval/rewards/margins"]


def test_logged_eval_equals_dsdpo_eval_preference_of_the_saved_policy(trained, tiny_gemma_dir, tmp_path):
    folder, eval_file = trained
    out = tmp_path / "report.json"
    args = ["--model", folder / "run", "--ref", tiny_gemma_dir, "--data", eval_file, "--json", out]
    result = run(
        "eval", "preference", *args, "--budget", "4", "--beta", "0.5", "--seed", "3", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    logged = metrics_by_step(folder / "run")[8]
    assert logged["eval/loss"] == pytest.approx(report["loss"], abs=1e-5)
    assert logged["eval/rewards/margins"] == pytest.approx(report["reward_margin"], abs=1e-5)
    assert logged["eval/logps/chosen"] == pytest.approx(report["policy_chosen_elbo"], abs=1e-4)
    assert logged["eval/rewards/accuracies"] == report["reward_accuracy"]


def test_held_out_rows_that_are_training_rows_are_refused(tiny_gemma_dir, trained, tmp_path):
    folder, _ = trained
    args = train_args(
        REPO / "ds_configs" / "cpu.json",
        tiny_gemma_dir,
        folder / "train.jsonl",
        tmp_path / "run",
        eval_data=folder / "train.jsonl",
    )
    result = run_train(args)
    assert result.returncode == 2 and "held-out rows are also training rows" in result.stderr, tail(result)
