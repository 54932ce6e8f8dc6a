"""Data commands: `dsdpo init-tiny`, `dsdpo data stats`, `dsdpo make-pairs`."""

from __future__ import annotations

import click

from dsdpo.cli.common import (
    _LOADING_KNOBS,
    DsdpoGroup,
    _generator,
    _load_for_sampling,
    _resolve_device,
    loading_options,
    sampler_settings,
    sampler_settings_options,
)


@click.command("init-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--arch",
    type=click.Choice(["gemma", "bert"]),
    default="gemma",
    show_default=True,
    help="gemma: a bidirectional decoder like LLaDA; bert: a masked-LM encoder.",
)
@click.option("--hidden-size", default=64, show_default=True, help="Width of the model.")
@click.option("--layers", "num_layers", default=2, show_default=True, help="Number of transformer layers.")
@click.option("--heads", "num_heads", default=2, show_default=True, help="Attention heads.")
@click.option("--intermediate-size", default=128, show_default=True, help="Width of the feed-forward layer.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
def init_tiny_command(out_dir, **options):
    """Write a tiny random model with a character tokenizer to OUT_DIR (for demos and tests).

    The folder loads with transformers and with every dsdpo command; its config names the mask token.
    """
    from dsdpo.models.tiny import init_tiny

    folder = init_tiny(out_dir, **options)
    click.echo(f"wrote a tiny {options['arch']} model to {folder}")


@click.group("data", cls=DsdpoGroup)
def data_group():
    """Inspect preference data files."""


@data_group.command("stats")
@click.argument("file", type=click.Path(exists=True))
@click.option(
    "--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model folder (tokenizer)."
)
@click.option(
    "--max-length", type=int, default=None, help="Report how many pairs this length would truncate."
)
@click.option("--max-prompt-length", type=int, default=None, help="Prompt budget used with --max-length.")
@click.option("--skip-invalid", is_flag=True, help="Count bad rows instead of stopping at the first.")
@click.option("--split", default=None, help="Split of a datasets folder (default: train).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the tokenizer's own code (LLaDA, Dream).")
def data_stats_command(
    file, model_dir, max_length, max_prompt_length, skip_invalid, split, as_json, trust_remote_code
):
    """Counts, token length percentiles, tokens per pair and truncation of a preference FILE."""
    import json

    from dsdpo.data.loading import load_preference_data
    from dsdpo.data.stats import data_stats, format_stats
    from dsdpo.models.loading import load_tokenizer

    examples, skipped = load_preference_data(file, skip_invalid=skip_invalid, split=split)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    stats = data_stats(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    click.echo(
        json.dumps({**stats, "skipped": skipped}, indent=2) if as_json else format_stats(stats, skipped)
    )


@click.command("make-pairs")
@click.option(
    "--source",
    required=True,
    help="reasoning-gym:NAME (e.g. reasoning-gym:gsm_symbolic), champ[:VERSION], or a .jsonl of "
    "question/solution/answer rows; or `model`: the answers --model samples for --problems.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL of pairs.")
@click.option("--num", type=int, default=None, help="Number of problems (required for reasoning-gym).")
@click.option("--seed", default=0, show_default=True, help="Seed of the generator and of the variants.")
@click.option(
    "--mix",
    default="wrong_arithmetic=0.4,truncated_chain=0.2,missing_step=0.2,verbose=0.2",
    show_default=True,
    help="Weights of the rejected kinds.",
)
@click.option(
    "--pairs-per-problem", default=1, show_default=True, help="Pairs (distinct rejected) per problem."
)
@click.option("--model", "model_dir", type=click.Path(), help="--source model: the model that answers.")
@click.option(
    "--problems",
    help="--source model: a JSONL of question/answer rows, or reasoning-gym:NAME (with --num).",
)
@click.option("--samples", default=8, show_default=True, help="--source model: answers sampled per problem.")
@click.option(
    "--prompt-template", default="{question}", show_default=True, help="--source model: question -> prompt."
)
@click.option("--batch-size", default=8, show_default=True, help="--source model: answers sampled together.")
@loading_options
@sampler_settings_options
def make_pairs_command(source, out, num, seed, mix, pairs_per_problem, **model_source):
    """Write reasoning preference pairs: chosen = a correct worked solution, rejected = a labelled variant.

    Every pair is checked: chosen reaches the correct final answer, wrong kinds (wrong_arithmetic,
    truncated_chain) do not, flawed kinds (missing_step, verbose) keep it.

    With --source model, the pairs are on-policy: --model samples --samples answers per problem of
    --problems (sampler options as in `dsdpo generate`, with --temperature > 0), each is judged as
    `dsdpo eval accuracy` judges, and a problem with a right and a wrong answer gives a pair
    (chosen: right, rejected: wrong).

    Chat, as in every command: prompts are user turns of the model's chat template when its tokenizer
    has one (--no-chat: plain); without a model, plain unless --chat. The rows record it: a chat
    prompt is written as {role, content} messages (training renders them with the template), a plain
    one as text.
    """
    settings = sampler_settings(model_source)
    if source == "model":
        _make_on_policy_pairs(out, num, seed, settings, **model_source)
        return
    chat = bool(settings.chat)  # no model, no tokenizer: plain unless --chat
    from dsdpo.data.reasoning.pairs import build_pairs, parse_mix, write_jsonl
    from dsdpo.data.reasoning.sources import load_problems
    from dsdpo.errors import DsdpoError

    if model_source["model_dir"] or model_source["problems"]:
        raise DsdpoError("--model and --problems are for --source model")
    weights = parse_mix(mix)  # a typo in an option fails before any problem is generated
    problems, skipped = load_problems(source, num=num, seed=seed)
    rows, counts = build_pairs(
        problems, mix=weights, seed=seed, pairs_per_problem=pairs_per_problem, chat=chat
    )
    write_jsonl(rows, out)
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    rows_kind = "conversational rows (--chat)" if chat else "plain-text rows (--chat: conversational)"
    click.echo(f"wrote {len(rows)} pairs from {len(problems)} problems to {out} ({summary}; {rows_kind})")
    if skipped:
        click.echo("skipped problems: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))


def _make_on_policy_pairs(
    out, num, seed, settings, *, model_dir, problems, samples, prompt_template, batch_size, **knobs
):
    from dsdpo.data.reasoning.pairs import write_jsonl
    from dsdpo.errors import DsdpoError
    from dsdpo.evaluation.accuracy import check_prompt_template
    from dsdpo.evaluation.answers import load_problems_jsonl, load_reasoning_gym
    from dsdpo.evaluation.on_policy import check_diversity, on_policy_pairs

    if not model_dir or not problems:
        raise DsdpoError("--source model needs --model DIR and --problems FILE (or reasoning-gym:NAME)")
    if samples < 2:
        raise DsdpoError(f"--samples must be at least 2 (a right and a wrong answer), got {samples}")
    check_prompt_template(prompt_template)
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
    device = _resolve_device(knobs.pop("device"))
    check_diversity(samples, settings.generate_kwargs())  # before any model is loaded
    if problems.startswith("reasoning-gym:"):
        if num is None:
            raise DsdpoError("--problems reasoning-gym:NAME needs --num, the number of problems")
        problem_list = load_reasoning_gym(problems.split(":", 1)[1], num, seed)
    else:
        problem_list = load_problems_jsonl(problems, num)
    model, tokenizer, mask_id, settings = _load_for_sampling(model_dir, device, settings, **model_knobs)
    sampler = dict(settings.generate_kwargs(), generator=_generator(seed, device))
    rows, counts = on_policy_pairs(
        model, tokenizer, problem_list, mask_token_id=mask_id, sampler=sampler, samples=samples,
        batch_size=batch_size, prompt_template=prompt_template, chat=settings.chat,
    )  # fmt: skip
    write_jsonl(rows, out)
    click.echo(
        f"wrote {counts['pairs']} pairs from {counts['problems']} problems to {out} "
        f"({counts['correct_samples']}/{counts['samples']} answers right; no pair: "
        f"{counts.get('all_correct', 0)} always right, {counts.get('all_wrong', 0)} always wrong, "
        f"{counts.get('no_usable_wrong', 0)} wrong only with empty answers)"
    )
