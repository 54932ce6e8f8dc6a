"""--eval-problems (issue 12): the generation accuracy logged during training equals what
`dsdpo eval accuracy` reports, by a separate code path, on the checkpoint saved at that step."""

import json

import pytest

from dsdpo.evaluation.accuracy import wilson_interval
from dsdpo.training.demo import write_jsonl
from tests.cli_helpers import run
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args, train_on_cpu
from tests.tiny_runs import training_and_held_out_rows

SAMPLER = dict(eval_gen_length=4, eval_block_length=2, eval_steps=4)


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out-accuracy")
    train, rows = training_and_held_out_rows(folder, held_out=12)
    problems = [{"question": row["prompt"], "answer": int(row["chosen"])} for row in rows]
    problems_file = write_jsonl(problems, folder / "problems.jsonl")
    train_on_cpu(
        tiny_gemma_dir, train, folder / "run", epochs=2, budget=2, beta=0.5, seed=3,
        eval_problems=problems_file, eval_num_problems=10, eval_every=4, save_every=4, keep_last=3, **SAMPLER,
    )  # fmt: skip
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
    assert result.returncode == 2 and "--eval-temperature" in result.stderr, tail(result)


def test_two_ranks_generate_in_step_and_log_what_eval_accuracy_reports(tiny_gemma_dir, trained, tmp_path):
    """Under 2 ranks every rank answers every problem (ZeRO-3 gathers collectively); the answers
    decoded without early stopping are those `dsdpo eval accuracy` gives the saved checkpoint (here
    with plain-text prompts: --no-eval-chat and --no-chat; the tiny tokenizer has a chat template)."""
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
    result = run_train([*args, "--no-eval-chat"], ranks=2)
    assert result.returncode == 0, tail(result)
    out = tmp_path / "records.jsonl"
    checked = run(
        "eval", "accuracy", "--model", tmp_path / "run" / "step_000002", "--data", problems_file,
        "--n", "6", "--gen-length", "4", "--block-length", "2", "--steps", "4", "--seed", "3",
        "--out", out, "--no-progress", "--no-chat",
    )  # fmt: skip
    assert checked.exit_code == 0, checked.output
    assert (tmp_path / "run" / "eval_generations" / "step_000002.jsonl").read_text() == out.read_text()


@pytest.mark.parametrize("chat", [True, False])
def test_questions_are_chat_turns_or_plain_text_and_answered_as_eval_accuracy_does(
    tiny_gemma, tokenizer, monkeypatch, tmp_path, chat
):
    """In-process, without DeepSpeed: the prompts HeldOutAccuracy samples from, and its records, are
    those of dsdpo.evaluation.accuracy.evaluate_accuracy with the same chat setting."""
    from types import SimpleNamespace

    import dsdpo.evaluation.held_out as held_out
    from dsdpo.evaluation.accuracy import evaluate_accuracy
    from dsdpo.evaluation.answers import load_problems_jsonl

    rows = [{"question": f"{a}+{a}=", "answer": 2 * a} for a in range(10, 13)]
    problems = load_problems_jsonl(write_jsonl(rows, tmp_path / "problems.jsonl"))
    sampler = dict(gen_length=4, block_length=4, steps=4, temperature=0.0, remasking="low_confidence")
    seen, generate = [], held_out.generate

    def spy(model, prompt_ids, **options):
        seen.extend(prompt_ids)
        return generate(model, prompt_ids, **options)

    monkeypatch.setattr(held_out, "generate", spy)
    mask = tokenizer.mask_token_id
    evaluation = held_out.HeldOutAccuracy(
        problems, tokenizer=tokenizer, mask_token_id=mask, sampler=sampler, seed=3, chat=chat
    )
    metrics, records = evaluation.run(SimpleNamespace(module=SimpleNamespace(model=tiny_gemma)))
    plain = [tokenizer(p.question)["input_ids"] for p in problems]
    assert (seen == plain) is not chat  # the tiny tokenizer has a chat template
    out = tmp_path / "records.jsonl"
    report = evaluate_accuracy(
        tiny_gemma, tokenizer, problems, mask_token_id=mask, sampler=sampler, chat=chat, out=out,
        progress=False,
    )  # fmt: skip
    assert metrics["eval/accuracy"] == report.accuracy
    assert records == [json.loads(line) for line in out.read_text().splitlines()]
