"""`dsdpo plan`: the click command (dsdpo/cli/__init__.py adds it to the group); heavy imports when it
runs. Defaults are training's: the settings schema's (dsdpo/config.py) and chunking's off-CUDA size."""

from __future__ import annotations

import click

from dsdpo.config import DataConfig, ScoreConfig
from dsdpo.planner.cards import CARDS
from dsdpo.planner.chunking import DEFAULT_TOKENS

DATA, SCORE = DataConfig(), ScoreConfig()


@click.command("plan")
@click.option(
    "--model",
    required=True,
    type=click.Path(exists=True),
    help="Model folder or its config.json (no weights read).",
)
@click.option("--ds_config", "--ds-config", "ds_config", required=True, type=click.Path(exists=True))
@click.option("--card", "card_name", default="rtx4080", show_default=True, type=click.Choice(list(CARDS)))
@click.option("--budget", type=int, default=SCORE.budget, show_default=True, help="Draws per response.")
@click.option(
    "--max-length", type=int, default=DATA.max_length, show_default=True, help="Prompt + response tokens."
)
@click.option(
    "--response-length", type=int, default=None, help="Response tokens (default: half of --max-length)."
)
@click.option(
    "--micro-batch", type=int, default=None, help="Pairs per micro-batch (default: the DeepSpeed config's)."
)
@click.option(
    "--accumulation", type=int, default=None, help="Micro-batches per step (default: the config's)."
)
@click.option("--max-tokens-per-forward", type=int, default=DEFAULT_TOKENS, show_default=True)
@click.option("--max-tokens-no-grad", type=int, default=None, help="Default: 4 x --max-tokens-per-forward.")
@click.option("--no-gradient-checkpointing", "no_checkpointing", is_flag=True)
@click.option(
    "--reference",
    type=click.Choice(["engine", "precomputed", "none"]),
    default="engine",
    show_default=True,
    help="A second ZeRO-3 engine, precomputed scores, or none (reference-free, SFT, LoRA's adapters off).",
)
@click.option(
    "--gpus", type=int, default=1, show_default=True, help="Ranks ZeRO-3 partitions the states over."
)
@click.option("--ram-gib", type=float, default=None, help="CPU RAM of the machine, to say whether it fits.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cli(model, ds_config, card_name, no_checkpointing, as_json, ram_gib, gpus, **options):
    """Will it fit, and how fast: GPU, CPU RAM and NVMe bytes, parameter sweeps per step and the time per
    pair of a training run, from config.json alone (the model is built on the meta device)."""
    from dsdpo.planner.report import plan_command

    click.echo(
        plan_command(
            model,
            ds_config,
            card_name=card_name,
            as_json=as_json,
            ram_gib=ram_gib,
            world_size=gpus,
            gradient_checkpointing=not no_checkpointing,
            **options,
        )
    )
