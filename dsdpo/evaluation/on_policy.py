"""On-policy preference pairs: the model's own answers, judged (`dsdpo make-pairs --source model`).

For each problem the model samples K answers with dsdpo's sampler; each is judged by the problem's
checker (dsdpo.evaluation.answers, as `dsdpo eval accuracy` judges). A problem with a correct and a wrong
answer gives one pair: its first correct answer (chosen) and its first wrong one (rejected), in
sampling order (an empty answer is no response to train on). Problems the model always solves or
never solves give no pair; they are counted.
This is the on-policy recipe of iterative RPO / LLaDA 1.5's reasoning data: the rejected answers
are the mistakes this model actually makes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from torch import nn
from tqdm import tqdm

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.accuracy import judge
from dsdpo.evaluation.answers import Problem
from dsdpo.evaluation.text_generation import generate_text


def check_diversity(samples: int, sampler: dict) -> None:
    """K > 1 samples of a deterministic sampler would be K copies of one answer."""
    if samples > 1 and sampler["temperature"] == 0 and sampler["remasking"] != "random":
        raise DsdpoError(
            f"--samples {samples} with --temperature 0 and low-confidence remasking gives {samples} "
            "copies of one answer: set --temperature > 0 (e.g. 0.7) or --remasking random"
        )


def on_policy_pairs(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    *,
    mask_token_id: int,
    sampler: dict,
    samples: int,
    batch_size: int = 8,
    prompt_template: str = "{question}",
    chat: bool = True,
    progress: bool = True,
) -> tuple[list[dict], dict[str, int]]:
    """Preference rows from the model's judged samples, and counts of what happened per problem."""
    check_diversity(samples, sampler)
    # Each problem's K copies go through the sampler together; one generator gives each its own noise.
    jobs = [(index, problem) for index, problem in enumerate(problems) for _ in range(samples)]
    judged: dict[int, list[dict]] = {index: [] for index in range(len(problems))}
    with tqdm(total=len(problems), desc="sampling", unit="problem", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            prompts = [prompt_template.format(question=problem.question) for _, problem in batch]
            texts = generate_text(
                model, tokenizer, prompts, mask_token_id=mask_token_id, chat=chat, **sampler
            )
            for (index, problem), text in zip(batch, texts, strict=True):
                judged[index].append(judge(problem, text))
            bar.update(sum(len(records) == samples for records in judged.values()) - bar.n)
    rows, counts = [], Counter(problems=len(problems), samples=len(jobs))
    for index, problem in enumerate(problems):
        records = judged[index]
        right = [r for r in records if r["correct"]]
        # An empty answer is wrong, but no response to train on.
        wrong = [r for r in records if not r["correct"] and r["generation"].strip()]
        counts["correct_samples"] += len(right)
        if not right or not wrong:
            counts[
                "all_wrong" if not right else "no_usable_wrong" if len(right) < samples else "all_correct"
            ] += 1
            continue
        prompt = prompt_template.format(question=problem.question)
        rows.append(
            {
                "id": f"on-policy-{index}",
                # As sampled: a chat prompt stays a user turn, so training renders the same template.
                "prompt": [{"role": "user", "content": prompt}]
                if chat and tokenizer.chat_template
                else prompt,
                "chosen": right[0]["generation"],
                "rejected": wrong[0]["generation"],
                "reference": problem.reference,
                "rejected_answer": wrong[0]["extracted"],
                "solve_rate": len(right) / samples,
            }
        )
    counts["pairs"] = len(rows)
    return rows, dict(counts)
