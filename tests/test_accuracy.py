import json
import sys

import pytest
import torch
from torch import nn

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.accuracy import (
    AccuracyReport,
    check_prompt_template,
    evaluate_accuracy,
    wilson_interval,
)
from dsdpo.evaluation.answers import (
    extract_answer,
    load_problems_jsonl,
    load_reasoning_gym,
    numbers_match,
    parse_number,
    reference_answer,
)


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("She has 3 apples, then 5 more.\n#### 8", "8"),
        ("#### 1,234 dollars", "1,234"),
        ("The answer is $12.50.", "$12.50"),
        ("So the answer is: -7", "-7"),
        ("Thus \\boxed{3/4}, which is 0.75 of 1", "3/4"),
        ("I counted 3, then 7 more, making 10.", "10"),
        ("#### 5 was a typo; the answer is 6", "5"),  # '####' outranks a later 'the answer is'
        ("It went 5 - 3 = 2", "2"),
        ("nothing numeric here", None),
        ("", None),
    ],
)
def test_extract_answer(generation, expected):
    assert extract_answer(generation) == expected


def test_numbers_compare_by_value():
    assert numbers_match("1,000", "1000")
    assert numbers_match("$42.00", "42")
    assert numbers_match("3/4", "0.75")
    assert numbers_match("-3", "-3.0")
    assert not numbers_match("42", "24")
    assert not numbers_match(None, "1")
    assert parse_number("50%") == 50
    assert parse_number("1/0") is None
    assert parse_number("abc") is None


def test_reference_answer_reads_numbers_and_gsm8k_solutions():
    assert reference_answer(42) == "42"
    assert reference_answer(2.5) == "2.5"
    assert reference_answer("Half of 10 is 5.\n#### 5") == "5"
    assert reference_answer("1,200") == "1,200"
    assert reference_answer("five") is None
    assert reference_answer(True) is None


def test_wilson_interval_against_hand_computed_values():
    # 8/10 at z=1.96: centre (0.8 + 0.19208)/1.38416 = 0.716738, half 1.416021·sqrt(0.025604) = 0.226581
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.490157, abs=1e-5) and high == pytest.approx(0.943319, abs=1e-5)
    # 0/10: the interval is [0, 2·0.138770], not empty as the normal approximation would make it
    low, high = wilson_interval(0, 10, z=1.96)
    assert low == 0.0 and high == pytest.approx(0.277540, abs=1e-5)
    low, high = wilson_interval(10, 10, z=1.96)
    assert high == 1.0 and low == pytest.approx(1 - 0.277540, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_report_summary():
    report = AccuracyReport.from_counts(8, 10)
    assert report.accuracy == 0.8
    assert report.summary().startswith("accuracy 0.8000 (8/10), 95% CI [0.49")


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_load_problems_reads_numbers_and_solutions(tmp_path):
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [{"question": "1+1?", "answer": 2}, "", {"question": "Half of 10?", "answer": "10/2 = 5\n#### 5"}],
    )
    problems = load_problems_jsonl(data)
    assert [(p.question, p.reference) for p in problems] == [("1+1?", "2"), ("Half of 10?", "5")]
    assert problems[1].is_correct("5.0") and not problems[1].is_correct("6")
    assert len(load_problems_jsonl(data, limit=1)) == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "answer": 1}, "{not json"], r"p\.jsonl:2: "),
        ([{"answer": 1}], r"p\.jsonl:1: 'question' is missing"),
        ([{"question": "q", "answer": "many"}], r"p\.jsonl:1: 'answer' 'many' is not a number"),
        (["[1, 2]"], r"p\.jsonl:1: a row must be a JSON object"),
        ([""], r"p\.jsonl: no problems"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(DsdpoError, match=message):
        load_problems_jsonl(write_jsonl(tmp_path / "p.jsonl", rows))


def test_missing_data_file(tmp_path):
    with pytest.raises(DsdpoError, match="no such data file"):
        load_problems_jsonl(tmp_path / "absent.jsonl")


def test_reasoning_gym_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if it were not installed
    with pytest.raises(DsdpoError, match=r"pip install 'dsdpo\[reasoning\]'"):
        load_reasoning_gym("gsm_symbolic", 2)


def test_reasoning_gym_problems_use_the_generators_scorer():
    pytest.importorskip("reasoning_gym")
    problems = load_reasoning_gym("gsm_symbolic", 3, seed=1)
    assert len(problems) == 3
    for problem in problems:
        assert problem.is_correct(problem.reference)
        assert not problem.is_correct(str(float(problem.reference) + 1))
    with pytest.raises(DsdpoError, match="no usable generator"):
        load_reasoning_gym("no_such_generator", 1)
    for refused in ({"no_such_option": 1}, {"min_digits": 3, "max_digits": 1}):  # unknown; invalid
        with pytest.raises(DsdpoError, match="chain_sum refused the options"):
            load_reasoning_gym("chain_sum", 1, **refused)


def test_prompt_templates_must_hold_only_the_question():
    assert check_prompt_template("Q: {question}\nA:") == "Q: {question}\nA:"
    with pytest.raises(DsdpoError, match="has no"):
        check_prompt_template("no field")
    with pytest.raises(DsdpoError, match="only"):
        check_prompt_template("{question} {other}")


class AnswerModel(nn.Module):
    """A denoiser certain of one answer text, whatever the prompt: it favours target[k] at the k-th of
    the last len(target) columns (the answer, since the answer ends the canvas)."""

    def __init__(self, target: list[int], vocab: int):
        super().__init__()
        self.target, self.vocab = torch.tensor(target), vocab
        self.margin = nn.Parameter(torch.tensor(30.0), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        rows, width = input_ids.shape
        logits = torch.zeros(rows, width, self.vocab)
        columns = torch.arange(width - len(self.target), width)
        logits[:, columns, self.target] = self.margin
        return logits


def test_evaluate_accuracy_judges_and_records_every_example(tmp_path, tokenizer):
    answer = tokenizer("So #### 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * 7
    model = AnswerModel(answer, vocab=len(tokenizer))
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "2+3?", "answer": 5},
            {"question": "Twice 3?", "answer": "2*3 = 6\n#### 6"},
            {"question": "10/2?", "answer": "5.0"},
        ],
    )
    out = tmp_path / "records.jsonl"
    report = evaluate_accuracy(
        model, tokenizer, load_problems_jsonl(data), mask_token_id=tokenizer.mask_token_id,
        sampler=dict(gen_length=16, block_length=8, steps=4), batch_size=2, out=out, progress=False,
    )  # fmt: skip
    assert (report.n, report.correct) == (3, 2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, False, True]
    assert records[1] == {
        "question": "Twice 3?",
        "reference": "6",
        "generation": "So #### 5",
        "extracted": "5",
        "correct": False,
        "chat": True,  # how the prompt was given (evaluate_accuracy's default: a user turn)
    }


def test_one_answer_module_serves_make_pairs_and_eval():
    from dsdpo.evaluation.answers import answers_match, extract_final_answer, final_answer_line, is_correct

    solution = "3 + 4 = 7\n" + final_answer_line("1,007")
    assert extract_final_answer(solution) == "1,007" and extract_answer(solution) == "1,007"
    assert is_correct(solution, "1007") and not is_correct("no answer line", "1007")
    assert answers_match("+12", "24/2") and answers_match("Paris.", "paris")
    assert not answers_match("1/0", "1") and parse_number("1/0") is None
