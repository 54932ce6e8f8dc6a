"""Generation accuracy on math problems: sample an answer per problem, extract it, judge it.

    report = evaluate_accuracy(model, tokenizer, problems, mask_token_id=m, sampler={...}, out=path)

The report carries the accuracy with a 95% Wilson score interval: on a few hundred problems the
interval is wide, and two models whose intervals overlap are not shown to differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from tqdm import tqdm

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.answers import Problem, extract_answer
from dsdpo.evaluation.text_generation import generate_text

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0% or 100% accuracy.
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half_width = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class AccuracyReport:
    n: int
    correct: int
    accuracy: float
    ci95_low: float
    ci95_high: float

    @classmethod
    def from_counts(cls, correct: int, n: int) -> AccuracyReport:
        low, high = wilson_interval(correct, n)
        return cls(n, correct, correct / n if n else 0.0, low, high)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"accuracy {self.accuracy:.4f} ({self.correct}/{self.n}), "
            f"95% CI [{self.ci95_low:.4f}, {self.ci95_high:.4f}]"
        )


def check_prompt_template(template: str) -> str:
    """A prompt template must hold {question} and no other field."""
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError) as err:
        raise DsdpoError(f"prompt template {template!r}: only {{question}} may be filled ({err})") from None
    if "\0" not in filled:
        raise DsdpoError(f"prompt template {template!r} has no {{question}}")
    return template


def judge(problem: Problem, generation: str) -> dict:
    """The per-example record: what was asked, expected, generated, read off, and whether it is right."""
    extracted = extract_answer(generation)
    return {
        "question": problem.question,
        "reference": problem.reference,
        "generation": generation,
        "extracted": extracted,
        "correct": bool(problem.is_correct(extracted)),
    }


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_accuracy(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    *,
    mask_token_id: int,
    sampler: dict,
    batch_size: int = 8,
    prompt_template: str = "{question}",
    chat: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
) -> AccuracyReport:
    """Generate for every problem (in batches), judge each, write per-example JSONL to `out` (with
    `chat`: whether the prompt was a user turn of the chat template)."""
    correct = judged = 0
    with (
        Path(out).open("w", encoding="utf-8") if out is not None else nullcontext() as sink,
        tqdm(total=len(problems), desc="accuracy", unit="problem", disable=not progress) as bar,
    ):
        for batch in _batches(problems, batch_size):
            prompts = [prompt_template.format(question=problem.question) for problem in batch]
            texts = generate_text(
                model, tokenizer, prompts, mask_token_id=mask_token_id, chat=chat, **sampler
            )
            for problem, text in zip(batch, texts, strict=True):
                record = {**judge(problem, text), "chat": chat}  # how the prompt was given, recorded
                correct += record["correct"]
                if sink is not None:
                    sink.write(json.dumps(record) + "\n")
            judged += len(batch)
            bar.update(len(batch))
            bar.set_postfix(accuracy=f"{correct / judged:.3f}")
    return AccuracyReport.from_counts(correct, len(problems))
