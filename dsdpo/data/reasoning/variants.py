"""Rejected variants of a correct worked solution, each of a named kind.

Wrong kinds (their final answer must not be the correct one):
- wrong_arithmetic: one equation's result is off, and the error is carried to the final answer.
- truncated_chain: the solution stops part-way and never states an answer.
Flawed kinds (the answer stays correct; the reasoning is worse):
- missing_step: one intermediate step is left out.
- verbose: hedging filler and vague restatements around the same steps.

A variant function returns the rejected steps and final answer, or None when the solution offers no
way to make that kind (no equation whose result reaches the answer, a single step, ...).
"""

from __future__ import annotations

import random
from fractions import Fraction

from dsdpo.data.reasoning.arithmetic import carry_wrong_result, correct_equations
from dsdpo.evaluation.answers import answers_match, normalize

WRONG_KINDS = ("wrong_arithmetic", "truncated_chain")
FLAWED_KINDS = ("missing_step", "verbose")
KINDS = WRONG_KINDS + FLAWED_KINDS

Variant = tuple[list[str], str | None]  # rejected steps, final answer (None: none stated)

OFFSETS = (1, 2, 3, 4, 5, 10, -1, -2, -3)  # small slips, the kind a solver really makes
HEDGES = (
    "Hmm, this could be read in more than one way, but let us just go on.",
    "I am not completely sure about this part, although it probably does not matter much.",
    "There might be another approach here, possibly a better one, but this one will likely do.",
    "Let me restate what we have so far, more or less, before continuing.",
)


def wrong_arithmetic(steps: list[str], answer: str, rng: random.Random) -> Variant | None:
    candidates = [(i, m) for i, step in enumerate(steps) for m in correct_equations(step)]
    rng.shuffle(candidates)
    for index, equation in candidates:
        for offset in rng.sample(OFFSETS, len(OFFSETS)):
            wrong = Fraction(equation["result"]) + offset
            if wrong < 0:
                continue
            new_steps, changed = carry_wrong_result(steps, index, equation, wrong)
            new_answer = changed.get(normalize(answer), answer)
            if not answers_match(new_answer, answer):
                return new_steps, new_answer
    return None


def truncated_chain(steps: list[str], answer: str, rng: random.Random) -> Variant | None:
    if len(steps) < 2:
        return None
    return steps[: rng.randint(1, len(steps) - 1)], None


def missing_step(steps: list[str], answer: str, rng: random.Random) -> Variant | None:
    if len(steps) < 3:
        return None  # leaving out one of two steps is a truncation, not a skipped step
    dropped = rng.randrange(len(steps) - 1)  # never the last step, which leads to the answer
    return steps[:dropped] + steps[dropped + 1 :], answer


def verbose(steps: list[str], answer: str, rng: random.Random) -> Variant | None:
    padded = [rng.choice(HEDGES)]
    for step in steps:
        padded += [step, rng.choice(HEDGES)]
    return padded, answer


VARIANTS = {
    "wrong_arithmetic": wrong_arithmetic,
    "truncated_chain": truncated_chain,
    "missing_step": missing_step,
    "verbose": verbose,
}
