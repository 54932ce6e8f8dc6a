"""benchmarks/alignment_effect.py's tasks: the problems it trains on and holds out, no training."""

import json
import re

import pytest

from benchmarks.alignment_effect import paired, pooled, split_task, table, word_problems


def test_the_default_task_is_the_word_problems_split_as_before(tmp_path):
    held_out, training = split_task(None, 0, {}, 300, tmp_path)
    rows = word_problems(seed=0)
    assert (len(held_out), len(training)) == (300, 1179)
    assert [p.question for p in held_out + training] == [row["question"] for row in rows]
    assert [p.reference for p in held_out + training] == [str(row["answer"]) for row in rows]


def test_a_jsonl_task_is_read_by_dsdpos_loader_and_split_with_no_shared_question(tmp_path):
    rows = [
        {"question": "1+1?", "answer": 2},
        {"question": "2+3?", "answer": "2 and 3 make 5\n#### 5"},
        {"question": "1+1?", "answer": 2},  # asked twice: kept once
        {"question": "9-4?", "answer": "5"},
        {"question": "3*4?", "answer": 12},
    ]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out, training = split_task(str(task), 0, {}, 1, tmp_path)
    assert (len(held_out), len(training)) == (1, 3)
    answers = {p.question: p.reference for p in held_out + training}
    assert answers == {"1+1?": "2", "2+3?": "5", "9-4?": "5", "3*4?": "12"}
    five = next(p for p in held_out + training if p.question == "2+3?")
    assert five.is_correct("5.0") and not five.is_correct("6")


def test_a_reasoning_gym_task_is_generated_with_its_options_and_judged_by_its_scorer(tmp_path):
    pytest.importorskip("reasoning_gym")
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    held_out, training = split_task("chain_sum", 40, options, 10, tmp_path)
    problems = held_out + training
    assert len(held_out) == 10 and len(training) == len({p.question for p in problems}) - 10
    for problem in problems:  # "... problem: 4 - 1 =": the answer worked out here
        a, op, b = re.search(r"(\d) ([+-]) (\d) =$", problem.question).groups()
        assert int(problem.reference) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert problem.is_correct(problem.reference) and not problem.is_correct(
            str(int(problem.reference) + 1)
        )


def test_answers_longer_than_the_sampler_canvas_are_refused(tmp_path):
    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({"question": "big?", "answer": 12345}) + "\n")
    with pytest.raises(SystemExit, match="longer than the sampler's 4 positions"):
        split_task(str(task), 0, {}, 0, tmp_path)


def test_arms_against_the_control_pool_over_seeds_with_an_exact_mcnemar_test():
    right, control = [True, True, True, False, False], [True, False, False, True, False]
    assert paired(right, control) == {"won": 2, "lost": 1, "mcnemar_p": 1.0}  # 2 * (1 + 3) / 8 = 1
    rows = [
        {"arm": "b", "seed": seed, "correct": 1, "n": 2, "vs_sft": {"won": 0, "lost": 0}, "vs_r": vs_r}
        | dict.fromkeys(("eval_reward_accuracy", "diff_stderr", "grad_norm_var"))
        for seed, vs_r in enumerate([{"won": 3, "lost": 1}, {"won": 2, "lost": 0}])
    ]
    both = pooled(rows, "b")
    assert both["vs_r"] == {"won": 5, "lost": 1, "mcnemar_p": 2 * (1 + 6) / 64}  # P(X <= 1), X ~ B(6, 1/2)
    assert "| +5/-1 (p=0.219) |" in table([both])
