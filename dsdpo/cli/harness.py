"""`dsdpo eval harness`: lm-evaluation-harness tasks on a dsdpo model (dsdpo.evaluation.harness)."""

from __future__ import annotations

import click

from dsdpo.cli.common import (
    _LOADING_KNOBS,
    _generator,
    _load_for_sampling,
    _resolve_device,
    _write_json,
    model_options,
    sampler_options,
    sampler_settings,
)
from dsdpo.config import ScoreConfig


def _limit(value: float | None) -> int | float | None:
    """lm_eval's --limit: a count of documents per task, or a fraction of them below 1."""
    return int(value) if value is not None and value >= 1 else value


@click.command("harness")
@model_options
@click.option(
    "--tasks",
    required=True,
    help="lm_eval task names, comma-separated (gsm8k, minerva_math, arc_challenge, ... or your own "
    "from --include-path).",
)
@click.option(
    "--include-path",
    type=click.Path(exists=True, file_okay=False),
    help="A folder of your own task YAMLs (lm_eval's --include_path).",
)
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples (default: each task's).")
@click.option(
    "--limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Documents per task: the first N, or a fraction below 1 (for trying a task; not for reporting).",
)
@sampler_options
@click.option(
    "--budget",
    default=ScoreConfig().budget,
    show_default=True,
    type=click.IntRange(min=1),
    help="Monte Carlo draws of each loglikelihood's ELBO (multiple-choice tasks); LLaDA's published "
    "likelihood runs use 128.",
)
@click.option(
    "--check-greedy",
    is_flag=True,
    help="Compute loglikelihood's is_greedy (greedy denoising reproduces the continuation; read by "
    "lambada's acc); without it is_greedy is False, as in LLaDA's runs.",
)
@click.option("--log-samples", is_flag=True, help="Also write every request and response, per task.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for results.json (metrics and the settings used) and samples_<task>.jsonl.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def eval_harness_command(
    model_dir, device, tasks, include_path, num_fewshot, limit, budget, check_greedy, log_samples, out,
    progress, **knobs,
):  # fmt: skip
    """Run lm-evaluation-harness tasks with this model: generation tasks through the family's sampler
    (the options below, as `dsdpo eval accuracy`), multiple-choice tasks through the ELBO.

    Needs the harness extra: pip install 'dsdpo[harness]'. With chat (by default when the tokenizer has
    a chat template, as in every command) prompts are rendered with it, few-shot examples as turns
    (lm_eval's --apply_chat_template --fewshot_as_multiturn). Perplexity tasks (loglikelihood_rolling)
    are refused.
    """
    import json
    from pathlib import Path

    from dsdpo.errors import DsdpoError
    from dsdpo.evaluation.harness import DsdpoLM, check_tasks, run_tasks, sampler_record
    from dsdpo.objective.scoring import ScoreSettings

    task_names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not task_names:
        raise DsdpoError("--tasks names no task")
    settings = sampler_settings(knobs)
    batch_size, seed = knobs.pop("batch_size"), knobs["seed"]
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
    device = _resolve_device(device)
    task_manager = check_tasks(task_names, include_path)  # before the model loads: it fails fast
    model, tokenizer, mask_id, settings = _load_for_sampling(model_dir, device, settings, **model_knobs)
    sampler = dict(settings.generate_kwargs(), generator=_generator(seed, device))
    lm = DsdpoLM(
        model, tokenizer, mask_token_id=mask_id, sampler=sampler, chat=settings.chat, batch_size=batch_size,
        score=ScoreSettings(budget=budget, seed=seed, batch_size=batch_size), check_greedy=check_greedy,
        progress=progress,
    )  # fmt: skip
    results = run_tasks(
        lm, task_names, include_path=include_path, num_fewshot=num_fewshot, limit=_limit(limit),
        log_samples=log_samples, seed=seed, task_manager=task_manager,
    )  # fmt: skip
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {})
    results["dsdpo"] = {
        "model": str(model_dir), "tasks": task_names, "include_path": include_path,
        "num_fewshot": num_fewshot, "limit": limit, "chat": lm.chat, "batch_size": batch_size,
        "sampler": sampler_record(sampler), "seed": seed, "budget": budget,
        "estimator": lm.score.estimator, "check_greedy": check_greedy, **model_knobs,
    }  # fmt: skip
    _write_json(folder / "results.json", json.loads(json.dumps(results, default=str)))
    for task, rows in samples.items():
        with open(folder / f"samples_{task}.jsonl", "w", encoding="utf-8") as sink:
            sink.writelines(json.dumps(row, default=str) + "\n" for row in rows)
    from lm_eval.utils import make_table

    click.echo(make_table(results))
    click.echo(
        f"wrote {folder / 'results.json'}" + (f" and {len(samples)} samples file(s)" if samples else "")
    )
