"""--eval-problems (issue 12): the generation accuracy logged during training equals what
`dsdpo eval accuracy` reports, by a separate code path, on the checkpoint saved at that step."""

import json

import pytest

from dsdpo.accuracy import wilson_interval
from dsdpo.demo import addition_pairs, write_jsonl
from tests.cli_helpers import run
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

SAMPLER = dict(eval_gen_length=4, eval_block_length=2, eval_gen_steps=4)


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out-accuracy")
    train = write_jsonl(addition_pairs(16, seed=1), folder / "train.jsonl")
    rows = addition_pairs(12, seed=2)
    problems = [{"question": row["prompt"], "answer": int(row["chosen"])} for row in rows]
    problems_file = write_jsonl(problems, folder / "problems.jsonl")
    args = train_args(
        REPO / "ds_configs" / "cpu.json",
        tiny_gemma_dir,
        train,
        folder / "run",
        epochs=2,
        budget=2,
        beta=0.5,
        seed=3,
        eval_problems=problems_file,
        eval_num_problems=10,
        eval_every=4,
        save_every=4,
        keep_last=3,
        **SAMPLER,
    )
    result = run_train(args)
    assert result.returncode == 0, tail(result)
    return folder, problems_file


def test_accuracy_is_logged_with_its_wilson_interval_at_every_evaluation(trained):
    folder, _ = trained
    metrics = metrics_by_step(folder / "run")
    evaluated = sorted(step for step, record in metrics.items() if "eval/accuracy" in record)
    assert evaluated == [0, 4, 8]
    for step in evaluated:
        records = (folder / "run" / "eval_generations" / f"step_{step:06d}.jsonl").read_text().splitlines()
        correct = sum(json.loads(line)["correct"] for line in records)
        assert len(records) == 10  # --eval-num-problems
        assert metrics[step]["eval/accuracy"] == correct / 10
        low, high = wilson_interval(correct, 10)
        assert metrics[step]["eval/accuracy_ci95_low"] == pytest.approx(low)
        assert metrics[step]["eval/accuracy_ci95_high"] == pytest.approx(high)


@pytest.mark.parametrize("step", [4, 8])
def test_logged_accuracy_equals_dsdpo_eval_accuracy_of_the_checkpoint(trained, step, tmp_path):
    folder, problems_file = trained
    out, report = tmp_path / "records.jsonl", tmp_path / "report.json"
    result = run(
        "eval", "accuracy", "--model", folder / "run" / f"step_{step:06d}", "--data", problems_file,
        "--n", "10", "--gen-length", "4", "--block-length", "2", "--steps", "4", "--seed", "3",
        "--out", out, "--json", report, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    logged = metrics_by_step(folder / "run")[step]
    expected = json.loads(report.read_text())
    assert logged["eval/accuracy"] == expected["accuracy"]
    assert logged["eval/accuracy_ci95_low"] == pytest.approx(expected["ci95_low"])
    assert logged["eval/accuracy_ci95_high"] == pytest.approx(expected["ci95_high"])
    written = (folder / "run" / "eval_generations" / f"step_{step:06d}.jsonl").read_text()
    assert written == out.read_text()  # the same answers, word for word


def test_several_samples_need_a_temperature(tiny_gemma_dir, trained, tmp_path):
    folder, problems_file = trained
    args = train_args(
        REPO / "ds_configs" / "cpu.json",
        tiny_gemma_dir,
        folder / "train.jsonl",
        tmp_path / "run",
        eval_problems=problems_file,
        eval_samples=4,
    )
    result = run_train(args)
    assert result.returncode == 2 and "eval_temperature" in result.stderr, tail(result)


def test_two_ranks_generate_in_step_and_log_what_eval_accuracy_reports(tiny_gemma_dir, trained, tmp_path):
    """Under 2 ranks every rank answers every problem (ZeRO-3 gathers collectively); the answers
    decoded without early stopping are those `dsdpo eval accuracy` gives the saved checkpoint."""
    folder, problems_file = trained
    args = train_args(
        REPO / "ds_configs" / "cpu.json",
        tiny_gemma_dir,
        folder / "train.jsonl",
        tmp_path / "run",
        max_steps=2,
        budget=2,
        beta=0.5,
        seed=3,
        eval_problems=problems_file,
        eval_num_problems=6,
        **SAMPLER,
    )
    result = run_train(args, ranks=2)
    assert result.returncode == 0, tail(result)
    out = tmp_path / "records.jsonl"
    checked = run(
        "eval", "accuracy", "--model", tmp_path / "run" / "step_000002", "--data", problems_file,
        "--n", "6", "--gen-length", "4", "--block-length", "2", "--steps", "4", "--seed", "3",
        "--out", out, "--no-progress",
    )  # fmt: skip
    assert checked.exit_code == 0, checked.output
    assert (tmp_path / "run" / "eval_generations" / "step_000002.jsonl").read_text() == out.read_text()
