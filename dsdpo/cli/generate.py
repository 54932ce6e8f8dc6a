"""Generation commands: `dsdpo generate`, `dsdpo eval accuracy`."""

from __future__ import annotations

import click

from dsdpo.cli.common import (
    _LOADING_KNOBS,
    _generator,
    _load_for_sampling,
    _resolve_device,
    _write_jsonl,
    model_options,
    sampler_options,
    sampler_settings,
)


@click.command("generate")
@model_options
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several.")
@click.option(
    "--data",
    type=click.Path(),
    help='A JSONL file of prompts, one a line: {"prompt": ...} (or {"question": ...}).',
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write {prompt, generation, chat} JSONL here.")
@sampler_options
def generate_command(model_dir, device, prompts, data, out, **knobs):
    """Generate answers with LLaDA's sampler (block semi-autoregressive, low-confidence remasking).

    A block-diffusion model (SDAR, LLaDA 2.x) uses its own published sampler instead: its own blocks
    whatever --block-length says, the same steps per answer token, temperature 0 as its greedy (SDAR:
    top-k 1; LLaDA 2.x: the argmax).
    Prints each answer, separated by a line of dashes, or writes them to --out.
    """
    from dsdpo.errors import DsdpoError
    from dsdpo.evaluation.text_generation import generate_text, read_prompts_jsonl

    if bool(prompts) == bool(data):
        raise DsdpoError("give prompts with --prompt or a file with --data, not both and not neither")
    texts = list(prompts) if prompts else read_prompts_jsonl(data)
    settings = sampler_settings(knobs)
    batch_size = knobs.pop("batch_size")
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
    device = _resolve_device(device)
    model, tokenizer, mask_id, settings = _load_for_sampling(model_dir, device, settings, **model_knobs)
    sampler = dict(settings.generate_kwargs(), generator=_generator(knobs["seed"], device))
    generations = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        generations += generate_text(
            model, tokenizer, batch, mask_token_id=mask_id, chat=settings.chat, **sampler
        )
    if out:
        rows = [
            {"prompt": p, "generation": g, "chat": settings.chat}
            for p, g in zip(texts, generations, strict=True)
        ]
        _write_jsonl(out, rows)
        click.echo(f"wrote {len(generations)} generations to {out}")
    else:
        click.echo("\n---\n".join(generations))


@click.command("accuracy")
@model_options
@click.option(
    "--data",
    type=click.Path(),
    help='A JSONL file of problems: {"question": ..., "answer": N} where the answer may be a '
    "GSM8K solution ending in '#### N'.",
)
@click.option(
    "--reasoning-gym",
    "gym_name",
    help="Instead of --data, problems from this reasoning-gym generator (e.g. gsm_symbolic), "
    "judged by its own scorer. Needs: pip install 'dsdpo[reasoning]'.",
)
@click.option(
    "--n",
    "limit",
    type=click.IntRange(min=1),
    help="Number of problems: the first N of --data (default all); required with --reasoning-gym.",
)
@click.option(
    "--prompt-template",
    default="{question}",
    show_default=True,
    help="How a question becomes a prompt, e.g. \"{question}\\nEnd with '#### <number>'.\"",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Per-example JSONL: question, reference, "
              "generation, extracted, correct, chat.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON here "
              "(with the sampler's settings).")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@sampler_options
def eval_accuracy_command(
    model_dir, device, data, gym_name, limit, prompt_template, out, json_out, progress, **knobs,
):  # fmt: skip
    """Accuracy of generated final answers on math word problems, with a 95% Wilson interval.

    The answer read off a generation is the last '#### N', else '\\boxed{N}', else 'the answer is N',
    else the last number; it is right when its value equals the reference (1,000 = 1000.0).
    """
    import json
    from dataclasses import asdict

    from dsdpo.errors import DsdpoError
    from dsdpo.evaluation.accuracy import check_prompt_template, evaluate_accuracy
    from dsdpo.evaluation.answers import load_problems_jsonl, load_reasoning_gym

    if bool(data) == bool(gym_name):
        raise DsdpoError("give problems with --data or --reasoning-gym, not both and not neither")
    if gym_name and limit is None:
        raise DsdpoError("--reasoning-gym needs --n, the number of problems to generate")
    check_prompt_template(prompt_template)
    settings = sampler_settings(knobs)
    batch_size = knobs.pop("batch_size")
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
    device = _resolve_device(device)
    if gym_name:
        problems = load_reasoning_gym(gym_name, limit, knobs["seed"])
    else:
        problems = load_problems_jsonl(data, limit)
    model, tokenizer, mask_id, settings = _load_for_sampling(model_dir, device, settings, **model_knobs)
    sampler = dict(settings.generate_kwargs(), generator=_generator(knobs["seed"], device))
    report = evaluate_accuracy(
        model, tokenizer, problems, mask_token_id=mask_id, sampler=sampler, batch_size=batch_size,
        prompt_template=prompt_template, chat=settings.chat, out=out, progress=progress,
    )  # fmt: skip
    if json_out:
        with open(json_out, "w", encoding="utf-8") as sink:
            json.dump({**report.as_dict(), "sampler": asdict(settings)}, sink, indent=2)
    click.echo(report.summary())
