"""The `dsdpo` command line: a click group; each command imports its heavy modules when it runs."""

from __future__ import annotations

import click

from dsdpo import __version__
from dsdpo.errors import DsdpoError


class DsdpoGroup(click.Group):
    """Turns a DsdpoError into click's one-line 'Error: ...' and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DsdpoError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=DsdpoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsdpo")
def main():
    """Preference optimisation (DPO and its family) for masked diffusion language models.

    Training runs under DeepSpeed: `deepspeed launch/train.py --help`. These commands build tiny
    models, score and evaluate models, and export checkpoints.
    """


@main.command("init-tiny")
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
    from dsdpo.tiny import init_tiny

    folder = init_tiny(out_dir, **options)
    click.echo(f"wrote a tiny {options['arch']} model to {folder}")


@main.group("data", cls=DsdpoGroup)
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
    from dsdpo.models import load_tokenizer

    examples, skipped = load_preference_data(file, skip_invalid=skip_invalid, split=split)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    stats = data_stats(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    click.echo(
        json.dumps({**stats, "skipped": skipped}, indent=2) if as_json else format_stats(stats, skipped)
    )


@main.command("make-pairs")
@click.option(
    "--source",
    required=True,
    help="reasoning-gym:NAME (e.g. reasoning-gym:gsm_symbolic), champ[:VERSION], or a .jsonl of "
    "question/solution/answer rows.",
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
@click.option("--chat", is_flag=True, help="Write conversational rows ({role, content} messages).")
def make_pairs_command(source, out, num, seed, mix, pairs_per_problem, chat):
    """Write reasoning preference pairs: chosen = a correct worked solution, rejected = a labelled variant.

    Every pair is checked: chosen reaches the correct final answer, wrong kinds (wrong_arithmetic,
    truncated_chain) do not, flawed kinds (missing_step, verbose) keep it.
    """
    from dsdpo.data.reasoning.pairs import build_pairs, parse_mix, write_jsonl
    from dsdpo.data.reasoning.sources import load_problems

    weights = parse_mix(mix)  # a typo in an option fails before any problem is generated
    problems, skipped = load_problems(source, num=num, seed=seed)
    rows, counts = build_pairs(
        problems, mix=weights, seed=seed, pairs_per_problem=pairs_per_problem, chat=chat
    )
    write_jsonl(rows, out)
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    click.echo(f"wrote {len(rows)} pairs from {len(problems)} problems to {out} ({summary})")
    if skipped:
        click.echo("skipped problems: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
