"""Final answers: reading them off a text, comparing them, and math problems to judge them on.

The one module of final-answer extraction and comparison, used by `dsdpo eval accuracy` (lenient
`extract_answer` on model generations) and by `dsdpo make-pairs` (strict `extract_final_answer` on the
solutions it writes, which always end with a GSM8K-style line `#### <answer>`). Numbers compare by
value everywhere (`parse_number`).

Problems come from two sources:
- a JSONL file, one problem a line: {"question": ..., "answer": ...}, where the answer is a number or
  a GSM8K solution ending in "#### N";
- a reasoning-gym generator (e.g. gsm_symbolic), scored by the generator's own scorer
  (needs `pip install dsdpo[reasoning]`).

A generation's answer (`extract_answer`) is, in order of trust: the last "#### N", the last
"\\boxed{N}", the last "answer is N", else the last number in the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from dsdpo.errors import DsdpoError

ANSWER_MARK = "####"

# A number as people write it: -1,234.5  $12  3/4  .5  (a trailing sentence dot is not a decimal).
_NUMBER = r"-?\$?(?=\.?\d)(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?"
NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}")
MARKED_ANSWER_RES = (
    re.compile(rf"{ANSWER_MARK}\s*({_NUMBER})"),
    re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}"),
    re.compile(rf"answer\s+is\s*:?\s*({_NUMBER})", re.IGNORECASE),
)


def normalize(answer: str) -> str:
    """The answer without what does not change it: thousands separators, currency, a closing full stop."""
    return re.sub(r"(?<=\d),(?=\d{3})", "", answer.strip().rstrip(".").replace("$", "")).strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written like '1,234', '$5', '-3', '+2.50', '3/4', '50%'; else None."""
    cleaned = normalize(text).rstrip("%")
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", cleaned):
        return None
    try:
        return Fraction(cleaned)
    except ZeroDivisionError:
        return None


def _last_number(matches: list[str]) -> str | None:
    numbers = [match for match in matches if parse_number(match) is not None]
    return numbers[-1].strip() if numbers else None


def extract_answer(generation: str) -> str | None:
    """The final answer a generation states, as written (lenient: see the module docstring)."""
    for pattern in MARKED_ANSWER_RES:
        found = _last_number(pattern.findall(generation))
        if found is not None:
            return found
    return _last_number(NUMBER_RE.findall(generation))


def final_answer_line(answer: str) -> str:
    """The GSM8K-style last line of every solution dsdpo writes."""
    return f"{ANSWER_MARK} {answer}"


def extract_final_answer(text: str) -> str | None:
    """Strict: the text after the last `####`, or None when the solution never states an answer."""
    if ANSWER_MARK not in text:
        return None
    answer = text.rsplit(ANSWER_MARK, 1)[1].strip()
    return answer or None


def numbers_match(extracted: str | None, reference: str) -> bool:
    """Whether two written numbers have the same value ('42.0' == '42', '1,000' == '1000')."""
    if extracted is None:
        return False
    predicted, expected = parse_number(extracted), parse_number(reference)
    return predicted is not None and predicted == expected


def answers_match(given: str | None, correct: str) -> bool:
    """Numbers compare by value (12 == 12.0 == 24/2), other answers as case-folded text."""
    if given is None:
        return False
    if parse_number(given) is not None and parse_number(correct) is not None:
        return numbers_match(given, correct)
    return " ".join(normalize(given).casefold().split()) == " ".join(normalize(correct).casefold().split())


def is_correct(solution: str, correct: str) -> bool:
    """Whether a worked solution's `#### answer` line states the correct answer."""
    return answers_match(extract_final_answer(solution), correct)


@dataclass(frozen=True)
class Problem:
    """A question, its reference answer and how to judge a generation against it."""

    question: str
    reference: str
    is_correct: Callable[[str | None], bool]  # takes the extracted answer


def reference_answer(answer: object) -> str | None:
    """The final number of a JSONL `answer` field: a number, or a solution ending in '#### N'."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int | float):
        return str(answer)
    if not isinstance(answer, str):
        return None
    final = answer.rsplit("####", 1)[-1].strip()
    return final if parse_number(final) is not None else None


def _problem_from_row(row: object) -> Problem:
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object with 'question' and 'answer'")
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' is missing or not a non-empty string")
    reference = reference_answer(answer)
    if reference is None:
        raise ValueError(f"'answer' {answer!r} is not a number or a solution ending in '#### N'")
    return Problem(question, reference, lambda extracted: numbers_match(extracted, reference))


def load_problems_jsonl(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a JSONL file; a bad row is an error naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such data file")
    problems = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                problems.append(_problem_from_row(json.loads(line)))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise DsdpoError(f"{file}:{number}: {err}") from None
    if not problems:
        raise DsdpoError(f"{file}: no problems in the file")
    return problems


def load_reasoning_gym(name: str, size: int, seed: int = 0, **options) -> list[Problem]:
    """`size` problems from a reasoning-gym generator, each judged by the generator's own scorer.

    options: the generator's own settings (e.g. chain_sum's max_digits=1), passed to its config.
    """
    try:
        import reasoning_gym
    except ImportError:
        raise DsdpoError(
            "--reasoning-gym needs the reasoning-gym package: pip install 'dsdpo[reasoning]'"
        ) from None
    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except (KeyError, ValueError) as err:
        raise DsdpoError(f"reasoning-gym has no usable generator {name!r}: {err}") from None
    except (TypeError, AssertionError) as err:  # an unknown option; a value its config's validate() refuses
        raise DsdpoError(f"reasoning-gym's {name} refused the options {options}: {err}") from None
    return [_gym_problem(dataset, entry) for entry in dataset]


def _gym_problem(dataset, entry: dict) -> Problem:
    def is_correct(extracted: str | None) -> bool:
        # Generators give partial credit for near misses; only a full score counts as correct.
        return dataset.score_answer(answer=extracted, entry=entry) >= 1.0

    return Problem(entry["question"], str(entry["answer"]), is_correct)
