"""Preference pairs from worked solutions: chosen = the correct solution, rejected = a labelled variant.

Each problem draws its variant kinds from the mix with a generator keyed on (seed, problem id), so a
pair does not depend on which other problems are in the run. Every row carries its provenance, and
every pair is checked before it is written: chosen reaches the correct answer, a wrong kind does not,
a flawed kind keeps it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from dsdpo.data.reasoning.sources import ReasoningProblem
from dsdpo.data.reasoning.variants import KINDS, VARIANTS, WRONG_KINDS
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.answers import extract_final_answer, final_answer_line, is_correct

DEFAULT_MIX = {"wrong_arithmetic": 0.4, "truncated_chain": 0.2, "missing_step": 0.2, "verbose": 0.2}
INSTRUCTION = 'Solve step by step, then give the final answer on a last line "#### <answer>".'


def parse_mix(text: str) -> dict[str, float]:
    """`wrong_arithmetic=2,verbose=1` -> weights; kinds left out get weight 0."""
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise DsdpoError(f"--mix: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise DsdpoError(f"--mix: {kind} needs a weight, as in {kind}=1") from None
        if mix[kind] < 0:
            raise DsdpoError(f"--mix: the weight of {kind} is negative")
    if not any(mix.values()):
        raise DsdpoError("--mix: give at least one kind a positive weight")
    return mix


def solution_text(steps: list[str], answer: str | None) -> str:
    return "\n".join(steps if answer is None else [*steps, final_answer_line(answer)])


def draw_variant(problem: ReasoningProblem, mix: dict[str, float], rng: random.Random, taken: set[str]):
    """(kind, rejected text) by the mix; a kind this problem cannot give is dropped and redrawn."""
    kinds = {kind: weight for kind, weight in mix.items() if weight > 0}
    while kinds:
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        variant = VARIANTS[kind](problem.steps, problem.answer, rng)
        if variant is not None and solution_text(*variant) not in taken:
            return kind, solution_text(*variant)
        del kinds[kind]
    return None


def check_pair(row: dict) -> None:
    """The promise of every row: chosen is right; a wrong kind is wrong; a flawed kind keeps the answer."""
    if not is_correct(row["chosen"], row["answer"]):
        raise DsdpoError(f"pair {row['id']}: chosen does not reach the answer {row['answer']!r}")
    rejected_correct = is_correct(row["rejected"], row["answer"])
    if rejected_correct == (row["rejected_kind"] in WRONG_KINDS):
        state = "reaches" if rejected_correct else "does not reach"
        raise DsdpoError(f"pair {row['id']}: the {row['rejected_kind']} rejected {state} the answer")


def as_messages(role: str, text: str, chat: bool):
    return [{"role": role, "content": text}] if chat else text


def problem_pairs(problem, *, mix, seed: int, pairs_per_problem: int, chat: bool) -> list[dict]:
    rng = random.Random(f"dsdpo-make-pairs:{seed}:{problem.id}")
    chosen = solution_text(problem.steps, problem.answer)
    rows, taken = [], {chosen}
    for number in range(pairs_per_problem):
        drawn = draw_variant(problem, mix, rng, taken)
        if drawn is None:
            break
        kind, rejected = drawn
        taken.add(rejected)
        row = {
            "id": f"{problem.id}:{number}",
            "prompt": as_messages("user", f"{problem.question}\n{INSTRUCTION}", chat),
            "chosen": chosen,
            "rejected": rejected,
            "rejected_kind": kind,
            "answer": problem.answer,
            "rejected_answer": extract_final_answer(rejected),
            "provenance": {**problem.provenance, "problem_id": problem.id, "make_pairs_seed": seed},
        }
        check_pair(row)
        rows.append(
            {
                **row,
                "chosen": as_messages("assistant", chosen, chat),
                "rejected": as_messages("assistant", rejected, chat),
            }
        )
    return rows


def build_pairs(
    problems: list[ReasoningProblem],
    *,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    pairs_per_problem: int = 1,
    chat: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Rows of prompt/chosen/rejected with labels and provenance, and counts by kind."""
    rows, counts = [], Counter()
    for problem in problems:
        made = problem_pairs(
            problem, mix=mix or DEFAULT_MIX, seed=seed, pairs_per_problem=pairs_per_problem, chat=chat
        )
        counts.update(row["rejected_kind"] for row in made)
        counts["problems_without_pair"] += not made
        rows += made
    return rows, dict(counts)


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
