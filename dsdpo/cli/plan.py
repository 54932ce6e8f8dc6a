"""`dsdpo plan`: the click command (dsdpo/cli/__init__.py adds it to the group); heavy imports when it
runs. Defaults are training's: the settings schema's (dsdpo/config/) and chunking's off-CUDA size."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from dsdpo.config import DEFAULT_TOKENS, DataConfig, ScoreConfig
from dsdpo.errors import DsdpoError
from dsdpo.planner.cards import CARDS

DATA, SCORE = DataConfig(), ScoreConfig()


POSITIVE = click.IntRange(min=1)


@click.command("plan")
@click.option(
    "--model",
    required=True,
    type=click.Path(exists=True),
    help="Model folder or its config.json (no weights read).",
)
@click.option(
    "--ds_config",
    "--ds-config",
    "ds_config",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The DeepSpeed config to plan (checked as training checks it).",
)
@click.option("--card", "card_name", default="rtx4080", show_default=True, type=click.Choice(list(CARDS)))
@click.option("--budget", type=POSITIVE, default=SCORE.budget, show_default=True, help="Draws per response.")
@click.option(
    "--max-length",
    type=POSITIVE,
    default=DATA.max_length,
    show_default=True,
    help="Prompt + response tokens.",
)
@click.option(
    "--response-length",
    type=POSITIVE,
    default=None,
    help="Response tokens, at most --max-length (default: --max-length, the bound: every token of a row "
    "can be a masked response token).",
)
@click.option(
    "--micro-batch",
    type=POSITIVE,
    default=None,
    help="Pairs per micro-batch (default: the DeepSpeed config's).",
)
@click.option(
    "--accumulation", type=POSITIVE, default=None, help="Micro-batches per step (default: the config's)."
)
@click.option("--max-tokens-per-forward", type=POSITIVE, default=DEFAULT_TOKENS, show_default=True)
@click.option(
    "--max-tokens-no-grad", type=POSITIVE, default=None, help="Default: 4 x --max-tokens-per-forward."
)
@click.option("--no-gradient-checkpointing", "no_checkpointing", is_flag=True)
@click.option(
    "--reference",
    type=click.Choice(["engine", "precomputed", "none"]),
    default="engine",
    show_default=True,
    help="A second ZeRO-3 engine, precomputed scores, or none (reference-free, SFT). With --lora-rank the "
    "reference is the model with its adapters off.",
)
@click.option(
    "--lora-rank",
    type=POSITIVE,
    default=None,
    help="Plan LoRA adapters of this rank (training's --lora-rank, the family's default targets): only they "
    "get gradients and optimizer state.",
)
@click.option(
    "--gpus", type=POSITIVE, default=1, show_default=True, help="Ranks ZeRO-3 partitions the states over."
)
@click.option(
    "--ram-gib",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="CPU RAM of the machine: say whether the plan fits, and compare the placements (the recipes beside "
    "--ds_config), reference modes, gradient checkpointing and chunk sizes: the fastest setting that fits, "
    "with the command that runs it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (nothing else on stdout).")
def plan_cli(model, ds_config, card_name, no_checkpointing, as_json, ram_gib, gpus, **options):
    """Will it fit, and how fast: GPU, CPU RAM and NVMe bytes, parameter sweeps per step and the time per
    pair of a training run, from config.json alone (the model is built on the meta device)."""
    # DeepSpeed prints to stdout when it is imported (its accelerator); stdout is the plan's alone.
    with contextlib.redirect_stdout(sys.stderr):
        text = plan_command(
            model,
            ds_config,
            card_name=card_name,
            as_json=as_json,
            ram_gib=ram_gib,
            world_size=gpus,
            gradient_checkpointing=not no_checkpointing,
            **options,
        )
    click.echo(text)


def _checked_ds_config(path: str | Path, world_size: int, largest_parameter: int) -> dict:
    """The trainer's own checks of a DeepSpeed config (dsdpo.runtime.ds_config), without its NVMe folder."""
    from dsdpo.runtime.ds_config import read_ds_config, resolve_ds_config

    return resolve_ds_config(
        read_ds_config(path),
        world_size=world_size,
        total_steps=1,
        largest_parameter=largest_parameter,
        source=str(path),
        planning=True,
    )


def plan_command(
    model, ds_config_path, *, card_name, as_json, ram_gib, world_size=1, lora_rank=None, **options
) -> str:
    """`dsdpo plan`'s body: the text (or JSON) to print; with ram_gib, the settings compared too."""
    from dsdpo.planner.cards import card
    from dsdpo.planner.report import GIB, format_plan, plan, run_shape_from
    from dsdpo.planner.search import (
        DEFAULT_LORA_RANK,
        candidate_settings,
        compare,
        fastest_fitting,
        format_comparison,
        outcome_json,
    )
    from dsdpo.planner.shapes import lora_parameters, model_shape

    the_card = card(card_name)
    shape = model_shape(model)
    ds_config = _checked_ds_config(ds_config_path, world_size, shape.largest_parameter)
    max_length, response = options["max_length"], options.get("response_length")
    if response is not None and response > max_length:
        raise DsdpoError(f"--response-length {response} is longer than --max-length {max_length}")
    if lora_rank and options.get("reference") == "engine":
        options["reference"] = "adapter"  # LoRA's reference is its own model with the adapters off
    rank = lora_rank or DEFAULT_LORA_RANK
    # The adapters' count builds the model on the meta device again: only when LoRA is planned.
    adapters = lora_parameters(model, rank) if lora_rank or ram_gib is not None else None
    run = run_shape_from(
        ds_config,
        trainable_parameters=adapters if lora_rank else None,
        **{k: v for k, v in options.items() if v is not None},
    )
    result = plan(shape, ds_config, run, the_card, world_size=world_size)
    if ram_gib is None:
        return json.dumps(result, indent=2) if as_json else format_plan(result)
    ram_bytes = ram_gib * GIB
    settings = candidate_settings(Path(ds_config_path), lora_rank=lora_rank, reference=run.reference)
    configs = {
        setting.config: _checked_ds_config(setting.config, world_size, shape.largest_parameter)
        for setting in settings
    }
    outcomes = compare(
        shape,
        configs,
        settings,
        run,
        the_card,
        ram_bytes=ram_bytes,
        world_size=world_size,
        lora_parameters=adapters,
    )
    folder = str(Path(model).parent if Path(model).is_file() else model)
    if as_json:
        result["comparison"] = [outcome_json(outcome, model=folder, lora_rank=rank) for outcome in outcomes]
        fastest = {kind: fastest_fitting(outcomes, kind) for kind in ("full", "lora")}
        result["fastest_fitting"] = {
            kind: None if best is None else outcome_json(best, model=folder, lora_rank=rank)
            for kind, best in fastest.items()
        }
        return json.dumps(result, indent=2)
    comparison = format_comparison(outcomes, card=the_card, ram_bytes=ram_bytes, model=folder, lora_rank=rank)
    return f"{format_plan(result, ram_bytes=ram_bytes)}\n\n{comparison}"
