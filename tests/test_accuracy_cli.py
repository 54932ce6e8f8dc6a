"""`dsdpo generate` and `dsdpo eval accuracy` end to end on a tiny model folder, and their errors."""

import json

import click
import pytest

from dsdpo.cli import main
from tests.cli_helpers import assert_one_line_error, run

FAST = ["--gen-length", "8", "--block-length", "4", "--steps", "4", "--no-progress"]


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"question": "2+3?", "answer": 5}, {"question": "Half of 8?", "answer": "8/2 = 4\n#### 4"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_is_a_group_for_more_evaluations():
    assert isinstance(main.commands["eval"], click.Group)
    assert "accuracy" in main.commands["eval"].commands


def test_generate_prints_one_answer_per_prompt(tiny_gemma_dir, tmp_path):
    result = run(
        "generate", "--model", tiny_gemma_dir, "--prompt", "Hi", "--prompt", "What is 2+3?", *FAST[:-1]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "gen.jsonl"
    result = run("generate", "--model", tiny_gemma_dir, "--prompt", "Hi", "--out", out, *FAST[:-1])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "Hi" and "[MASK]" not in rows[0]["generation"]


def test_eval_accuracy_writes_records_and_report(tiny_gemma_dir, problems_file, tmp_path):
    records, report = tmp_path / "records.jsonl", tmp_path / "report.json"
    result = run(
        "eval", "accuracy", "--model", tiny_gemma_dir, "--data", problems_file,
        "--out", records, "--json", report, *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "95% CI" in result.output
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [line["reference"] for line in lines] == ["5", "4"]
    assert set(lines[0]) == {"question", "reference", "generation", "extracted", "correct", "chat"}
    summary = json.loads(report.read_text())
    assert summary["n"] == 2 and 0.0 <= summary["ci95_low"] <= summary["ci95_high"] <= 1.0


def test_eval_accuracy_bad_inputs_are_one_line_errors(tiny_gemma_dir, folder_without_mask_token, tmp_path):
    accuracy = ["eval", "accuracy", "--model", tiny_gemma_dir, *FAST]
    assert_one_line_error(run(*accuracy, "--data", tmp_path / "absent.jsonl"), "no such data file")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"question": "q", "answer": 1}\n{"question": "q"}\n')
    assert_one_line_error(run(*accuracy, "--data", malformed), "bad.jsonl:2:")
    assert_one_line_error(run(*accuracy), "--data or --reasoning-gym")
    assert_one_line_error(run(*accuracy, "--reasoning-gym", "gsm_symbolic"), "needs --n")
    assert_one_line_error(run(*accuracy, "--data", malformed, "--prompt-template", "x"), "has no {question}")
    no_mask = [
        "eval",
        "accuracy",
        "--model",
        folder_without_mask_token,
        "--data",
        malformed.parent / "ok.jsonl",
    ]
    (malformed.parent / "ok.jsonl").write_text('{"question": "q", "answer": 1}\n')
    assert_one_line_error(run(*no_mask, *FAST), "give it with --mask-token-id")
    assert_one_line_error(
        run("eval", "accuracy", "--model", tmp_path / "nope", "--data", malformed.parent / "ok.jsonl", *FAST),
        "no such model folder",
    )


def test_generate_bad_inputs_are_one_line_errors(tiny_gemma_dir, folder_without_mask_token, tmp_path):
    assert_one_line_error(run("generate", "--model", tiny_gemma_dir), "--prompt or a file with --data")
    assert_one_line_error(
        run("generate", "--model", tiny_gemma_dir, "--data", tmp_path / "absent.jsonl"), "no such data file"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert_one_line_error(run("generate", "--model", tiny_gemma_dir, "--data", bad), "bad.jsonl:2:")
    assert_one_line_error(
        run(
            "generate",
            "--model",
            tiny_gemma_dir,
            "--prompt",
            "Hi",
            "--gen-length",
            "10",
            "--block-length",
            "4",
        ),
        "not a multiple of block_length",
    )
    assert_one_line_error(
        run("generate", "--model", folder_without_mask_token, "--prompt", "Hi"),
        "give it with --mask-token-id",
    )
