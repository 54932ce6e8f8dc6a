"""Problems with correct worked solutions: reasoning-gym generators, CHAMP, or a JSONL file.

reasoning-gym and champ-dataset are optional (`pip install dsdpo[reasoning]`) and imported only
when asked for; both work offline (reasoning-gym generates, champ-dataset ships its JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.answers import ANSWER_MARK, answers_match, extract_final_answer


@dataclass
class ReasoningProblem:
    id: str
    question: str
    steps: list[str]  # the worked solution, one step a line, without the final answer line
    answer: str
    provenance: dict  # where it came from: enough to find or regenerate it


class SolutionDisagrees(ValueError):
    """The worked solution states a final answer other than the problem's answer."""


def solution_steps(solution: str | list[str], answer: str) -> list[str]:
    """Non-empty lines of a solution; its own `####` answer line is checked and dropped."""
    lines = solution if isinstance(solution, list) else solution.splitlines()
    stated = extract_final_answer("\n".join(lines))
    if stated is not None and not answers_match(stated, answer):
        raise SolutionDisagrees(f"the solution ends with {stated!r} but the answer is {answer!r}")
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(ANSWER_MARK)]


def missing_extra(package: str) -> DsdpoError:
    return DsdpoError(f"this source needs the optional package {package}: pip install 'dsdpo[reasoning]'")


def reasoning_gym_problems(name: str, num: int, seed: int, skipped: dict) -> list[ReasoningProblem]:
    try:
        import reasoning_gym
    except ImportError:
        raise missing_extra("reasoning-gym") from None
    try:
        dataset = reasoning_gym.create_dataset(name, size=num, seed=seed)
    except (KeyError, ValueError) as err:
        raise DsdpoError(f"reasoning-gym has no generator {name!r} ({err})") from None
    problems = []
    for index, entry in enumerate(dataset):
        cot = entry["metadata"].get("answer_cot")
        if cot is None:
            raise DsdpoError(
                f"reasoning-gym's {name} gives no worked solution (metadata answer_cot); try gsm_symbolic"
            )
        provenance = {"source": "reasoning-gym", "dataset": name, "seed": seed, "index": index}
        provenance["version"] = getattr(reasoning_gym, "__version__", "unknown")
        add_problem(
            problems,
            skipped,
            f"rg-{name}-{seed}-{index}",
            entry["question"],
            cot,
            entry["answer"],
            provenance,
        )
    return problems


def champ_problems(version: str, num: int | None, skipped: dict) -> list[ReasoningProblem]:
    try:
        import champ_dataset
    except ImportError:
        raise missing_extra("champ-dataset") from None
    try:
        dataset = champ_dataset.load(version)
    except FileNotFoundError:
        raise DsdpoError(f"champ-dataset has no version {version!r} (it ships v0)") from None
    dataset.sort()  # natural order of problem ids: the same problems for the same --num
    problems = []
    for identifier, problem in list(dataset.problems.items())[:num]:
        steps = [step.text for step in problem.solution.steps]
        provenance = {"source": "champ", "version": version, "problem_id": identifier}
        add_problem(
            problems,
            skipped,
            f"champ-{version}-{identifier}",
            problem.text,
            steps,
            problem.answer,
            provenance,
        )
    return problems


def jsonl_problems(path: Path, num: int | None, skipped: dict) -> list[ReasoningProblem]:
    """Rows of {question, solution, answer} (solution: text, one step a line, or a list of steps)."""
    problems = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = parse_problem_row(line, f"{path}:{number}")
            provenance = {"source": "jsonl", "file": str(path), "line": number}
            problem_id = str(row.get("id", f"{path.stem}-{number}"))
            add_problem(
                problems,
                skipped,
                problem_id,
                row["question"],
                row["solution"],
                str(row["answer"]),
                provenance,
            )
            if num is not None and len(problems) == num:
                break
    return problems


def parse_problem_row(line: str, source: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DsdpoError(f"{source}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise DsdpoError(f"{source}: the row is a {type(row).__name__}, not an object")
    expected = {
        "question": (str, "text"),
        "solution": (str | list, "text or a list of steps"),
        "answer": (str | int | float, "text or a number"),
    }
    for field, (types, description) in expected.items():
        if field not in row:
            raise DsdpoError(f'{source}: field "{field}" is missing')
        if not isinstance(row[field], types) or row[field] in ("", []):
            raise DsdpoError(f'{source}: field "{field}" must be non-empty {description}')
    return row


def add_problem(problems, skipped, problem_id, question, solution, answer, provenance) -> None:
    """Append a problem, or count it skipped when its worked solution contradicts its answer."""
    try:
        steps = solution_steps(solution, str(answer))
    except SolutionDisagrees:
        skipped["solution_disagrees"] = skipped.get("solution_disagrees", 0) + 1
        return
    if not steps:
        skipped["empty_solution"] = skipped.get("empty_solution", 0) + 1
        return
    problems.append(ReasoningProblem(problem_id, question, steps, str(answer), provenance))


def load_problems(
    source: str, *, num: int | None, seed: int
) -> tuple[list[ReasoningProblem], dict[str, int]]:
    """Problems from `reasoning-gym:NAME`, `champ[:VERSION]` or a .jsonl path, and skip counts."""
    skipped: dict[str, int] = {}
    if source.startswith("reasoning-gym:"):
        if num is None:
            raise DsdpoError("a reasoning-gym source generates problems: say how many with --num")
        problems = reasoning_gym_problems(source.split(":", 1)[1], num, seed, skipped)
    elif source == "champ" or source.startswith("champ:"):
        problems = champ_problems(source.partition(":")[2] or "v0", num, skipped)
    elif source.endswith(".jsonl"):
        if not Path(source).is_file():
            raise DsdpoError(f"{source}: no such file")
        problems = jsonl_problems(Path(source), num, skipped)
    else:
        raise DsdpoError(
            f"unknown source {source!r}: use reasoning-gym:NAME (e.g. gsm_symbolic), champ, or a .jsonl"
        )
    return problems, skipped
