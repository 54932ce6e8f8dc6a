"""`dsdpo make-pairs`: chosen answers score correct, wrong kinds score wrong, deterministic, labelled."""

import json
import re
from fractions import Fraction

import pytest
from click.testing import CliRunner

from dsdpo.cli import main
from dsdpo.data import load_preference_data
from dsdpo.errors import DsdpoError

PROBLEMS = [
    {
        "id": "eggs",
        "question": "3 boxes of 4 eggs, plus 5 eggs?",
        "solution": "3 * 4 = 12 eggs in boxes\n12 + 5 = 17 eggs\n#### 17",
        "answer": 17,
    },
    {
        "id": "pay",
        "question": "6 days a week for 2 weeks at 10 a day?",
        "solution": ["6 * 2 = 12 days", "12 * 10 = 120", "So 120 in all"],
        "answer": "120",
    },
    {
        "id": "cats",
        "question": "2 cats and 3 more?",
        "solution": "2 + 3 = 5\nThere are 5 cats\nThat is all",
        "answer": "5",
    },
]


def final_answer(text):
    """Independent of dsdpo's scorer: the number after the last '####', if any."""
    found = re.findall(r"####\s*(\S+)", text)
    return found[-1] if found else None


def wrong_equations(text):
    """How many `a op b = c` lines state a result their left side does not compute."""
    count = 0
    for left, right in re.findall(r"(\d+(?:\s*[-+*]\s*\d+)+)\s*=\s*(\d+)", text):
        count += Fraction(eval(left)) != Fraction(right)  # only digits and + - * reach eval
    return count


def make(tmp_path, *extra):
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["make-pairs", "--source", str(source), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()], result.output


def test_chosen_scores_correct_and_wrong_kinds_score_wrong(tmp_path):
    rows, output = make(
        tmp_path,
        "--pairs-per-problem",
        "4",
        "--mix",
        "wrong_arithmetic=1,truncated_chain=1,missing_step=1,verbose=1",
    )
    answers = {p["id"]: str(p["answer"]) for p in PROBLEMS}
    assert {row["rejected_kind"] for row in rows} == {
        "wrong_arithmetic",
        "truncated_chain",
        "missing_step",
        "verbose",
    }
    for row in rows:
        correct = answers[row["provenance"]["problem_id"]]
        assert final_answer(row["chosen"]) == correct
        assert wrong_equations(row["chosen"]) == 0
        rejected = final_answer(row["rejected"])
        if row["rejected_kind"] == "wrong_arithmetic":
            assert rejected is not None and rejected != correct
            # Exactly one slip; every later step is computed right from it.
            assert wrong_equations(row["rejected"]) == 1
        elif row["rejected_kind"] == "truncated_chain":
            assert rejected is None and row["chosen"].startswith(row["rejected"])
        else:
            assert rejected == correct and row["rejected"] != row["chosen"]
        assert row["provenance"]["source"] == "jsonl" and row["provenance"]["line"] >= 1
    assert "wrote" in output
    # The pairs load as preference data.
    examples, _ = load_preference_data(tmp_path / "pairs.jsonl")
    assert len(examples) == len(rows)


def test_wrong_arithmetic_carries_the_slip_to_the_answer(tmp_path):
    rows, _ = make(tmp_path, "--mix", "wrong_arithmetic=1", "--seed", "3")
    eggs = next(row for row in rows if row["provenance"]["problem_id"] == "eggs")
    lines = eggs["rejected"].splitlines()
    if lines[0].startswith("3 * 4 = 12"):  # the slip is in the last step
        slip = int(re.search(r"= (\d+)", lines[1]).group(1)) - 17
        assert lines[1] == f"12 + 5 = {17 + slip} eggs"
    else:  # the slip is in the first step and the second step uses it
        slipped = int(re.search(r"= (\d+)", lines[0]).group(1))
        assert lines[1] == f"{slipped} + 5 = {slipped + 5} eggs"
    assert final_answer(eggs["rejected"]) == eggs["rejected_answer"] != "17"


def test_same_seed_same_pairs_other_seed_other_pairs(tmp_path):
    first, _ = make(tmp_path, "--seed", "1", "--pairs-per-problem", "2")
    again, _ = make(tmp_path, "--seed", "1", "--pairs-per-problem", "2")
    other, _ = make(tmp_path, "--seed", "2", "--pairs-per-problem", "2")
    assert first == again
    assert [r["rejected"] for r in first] != [r["rejected"] for r in other]


def test_chat_rows_and_bad_sources(tmp_path):
    rows, _ = make(tmp_path, "--chat")
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": 1}) + "\n")
    result = CliRunner().invoke(
        main, ["make-pairs", "--source", str(bad), "--out", str(tmp_path / "o.jsonl")]
    )
    assert result.exit_code == 1
    assert f'Error: {bad}:1: field "solution" is missing' in result.output
    result = CliRunner().invoke(main, ["make-pairs", "--source", "x.csv", "--out", str(tmp_path / "o.jsonl")])
    assert "Error: unknown source 'x.csv'" in result.output
    result = CliRunner().invoke(
        main, ["make-pairs", "--source", str(bad), "--out", str(tmp_path / "o.jsonl"), "--mix", "typo=1"]
    )
    assert "Error: --mix: unknown kind 'typo'" in result.output


def test_a_solution_that_contradicts_its_answer_is_skipped(tmp_path):
    from dsdpo.data.reasoning.sources import load_problems

    source = tmp_path / "p.jsonl"
    source.write_text(json.dumps({"question": "q", "solution": "1 + 1 = 2\n#### 2", "answer": 3}) + "\n")
    problems, skipped = load_problems(str(source), num=None, seed=0)
    assert problems == [] and skipped == {"solution_disagrees": 1}
    with pytest.raises(DsdpoError, match="say how many with --num"):
        load_problems("reasoning-gym:gsm_symbolic", num=None, seed=0)


def test_gsm_symbolic_pairs_score_by_reasoning_gyms_own_scorer(tmp_path):
    reasoning_gym = pytest.importorskip("reasoning_gym")
    out = tmp_path / "gsm.jsonl"
    args = [
        "make-pairs",
        "--source",
        "reasoning-gym:gsm_symbolic",
        "--num",
        "12",
        "--out",
        str(out),
        "--seed",
        "5",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=12, seed=5)
    for line in out.read_text().splitlines():
        row = json.loads(line)
        entry = dataset[row["provenance"]["index"]]
        assert dataset.score_answer(final_answer(row["chosen"]), entry) == 1.0
        if row["rejected_kind"] in ("wrong_arithmetic", "truncated_chain"):
            assert dataset.score_answer(final_answer(row["rejected"]), entry) < 1.0
