"""Final answers of worked solutions: how they are written, read back and compared.

Every solution dsdpo writes ends with a GSM8K-style line `#### <answer>`; a text without one has no
final answer and scores wrong.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_MARK = "####"
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?(?:/\d+)?$")


def final_answer_line(answer: str) -> str:
    return f"{ANSWER_MARK} {answer}"


def extract_final_answer(text: str) -> str | None:
    """The text after the last `####`, or None when the solution never states an answer."""
    if ANSWER_MARK not in text:
        return None
    answer = text.rsplit(ANSWER_MARK, 1)[1].strip()
    return answer or None


def normalize(answer: str) -> str:
    # Thousands separators, currency and a closing full stop do not change the answer.
    return re.sub(r"(?<=\d),(?=\d{3})", "", answer.strip().rstrip(".").replace("$", "")).strip()


def as_number(answer: str) -> Fraction | None:
    text = normalize(answer)
    return Fraction(text) if NUMBER.match(text) else None


def answers_match(given: str | None, correct: str) -> bool:
    """Numbers compare by value (12 == 12.0 == 24/2), other answers as case-folded text."""
    if given is None:
        return False
    given_number, correct_number = as_number(given), as_number(correct)
    if given_number is not None and correct_number is not None:
        return given_number == correct_number
    return " ".join(normalize(given).casefold().split()) == " ".join(normalize(correct).casefold().split())


def is_correct(solution: str, correct: str) -> bool:
    return answers_match(extract_final_answer(solution), correct)
