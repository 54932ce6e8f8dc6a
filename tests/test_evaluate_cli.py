"""`dsdpo eval preference`, `dsdpo score` and `dsdpo compare` end to end on tiny model folders."""

import json
import math

import pytest

from tests.cli_helpers import assert_one_line_error, run

ROWS = [
    {"id": "a", "prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"id": "b", "prompt": "Sky?", "chosen": "blue", "rejected": "green!"},
]
FAST = ["--budget", "3", "--no-progress"]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_eval_preference_of_a_model_against_itself(tiny_gemma_dir, pairs_file, tmp_path):
    out = tmp_path / "report.json"
    args = ["--model", tiny_gemma_dir, "--ref", tiny_gemma_dir, "--data", pairs_file, "--json", out]
    result = run("eval", "preference", *args, *FAST)
    assert result.exit_code == 0, result.output
    assert "reward accuracy" in result.output and "policy-ref std error" in result.output
    report = json.loads(out.read_text())
    assert report["reward_margin"] == 0.0 and report["ratio_std_error"] == 0.0
    assert report["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert report["num_pairs"] == 2 and report["budget"] == 3


def test_eval_preference_reference_free(tiny_gemma_dir, pairs_file):
    result = run("eval", "preference", "--model", tiny_gemma_dir, "--data", pairs_file, *FAST)
    assert result.exit_code == 0, result.output
    assert "n/a (reference-free)" in result.output


def test_score_writes_one_row_per_pair(tiny_gemma_dir, pairs_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    result = run("score", "--model", tiny_gemma_dir, "--data", pairs_file, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["a", "b"]
    assert all(row["chosen_elbo"] < 0 and row["rejected_std_error"] > 0 for row in rows)


def test_score_pads_responses_to_the_canvas_on_request(tiny_gemma_dir, pairs_file, tmp_path):
    def scores(*extra):
        out = tmp_path / f"scores{len(extra)}{extra[-1] if extra else ''}.jsonl"
        result = run("score", "--model", tiny_gemma_dir, "--data", pairs_file, "--out", out, *FAST, *extra)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    bare = scores()
    # Every response is already at least 1 token: the same tokens, the same keyed draws, the same scores.
    assert scores("--pad-responses-to", "1") == bare
    padded = scores("--pad-responses-to", "12")
    assert all(p["chosen_elbo"] != b["chosen_elbo"] for p, b in zip(padded, bare, strict=True))


def test_compare_a_model_with_itself(tiny_gemma_dir, pairs_file, tmp_path):
    out = tmp_path / "compare.json"
    args = ["--base", tiny_gemma_dir, "--tuned", tiny_gemma_dir, "--data", pairs_file, "--json", out]
    result = run("compare", *args, *FAST)
    assert result.exit_code == 0, result.output
    gap = json.loads(out.read_text())["gap_difference"]
    assert gap["mean"] == 0.0 and gap["ci95_low"] <= 0.0 <= gap["ci95_high"]


def test_bad_inputs_are_one_line_errors(tiny_gemma_dir, folder_without_mask_token, pairs_file, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert_one_line_error(
        run("eval", "preference", "--model", tiny_gemma_dir, "--data", missing, *FAST), "no such file"
    )
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    assert_one_line_error(
        run("score", "--model", tiny_gemma_dir, "--data", malformed, "--out", tmp_path / "s.jsonl"),
        'bad.jsonl:2: field "rejected" is missing',
    )
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text("{not json\n")
    assert_one_line_error(
        run("compare", "--base", tiny_gemma_dir, "--tuned", tiny_gemma_dir, "--data", not_json),
        "broken.jsonl:1: not valid JSON",
    )
    for command in (
        ["eval", "preference", "--model", folder_without_mask_token],
        ["eval", "preference", "--model", tiny_gemma_dir, "--ref", folder_without_mask_token],
        ["score", "--model", folder_without_mask_token, "--out", tmp_path / "s.jsonl"],
        ["compare", "--base", tiny_gemma_dir, "--tuned", folder_without_mask_token],
    ):
        assert_one_line_error(run(*command, "--data", pairs_file, *FAST), "give it with --mask-token-id")
    assert_one_line_error(
        run("eval", "preference", "--model", tmp_path / "nowhere", "--data", pairs_file),
        "no such model folder",
    )
    assert_one_line_error(
        run(
            "score", "--model", tiny_gemma_dir, "--data", pairs_file, "--out", tmp_path / "s", "--budget", "0"
        ),
        "budget must be at least 1",
    )


def test_bad_rows_are_skipped_and_long_prompts_cut_on_request_and_both_reported(tiny_gemma_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    long_row = {"id": "long", "prompt": "x" * 40, "chosen": "y", "rejected": "z"}
    path.write_text("".join(json.dumps(row) + "\n" for row in [*ROWS, long_row]) + '{"prompt": "p"}\n')
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", tiny_gemma_dir, "--data", path, "--out", out, "--max-length", "20", *FAST]
    assert_one_line_error(run(*args), "mixed.jsonl:4: field")  # names the option that it suggests
    result = run(*args, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "missing_field 1" in result.output and "prompt_cut_to_fit 1" in result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "long"]
    result = run(*args, "--skip-invalid", "--refuse-long-prompts")
    assert result.exit_code == 0 and "prompt_too_long 1" in result.output, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_help_teaches():
    for command in (["eval", "preference"], ["score"], ["compare"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "--budget" in result.output and "--estimator" in result.output
