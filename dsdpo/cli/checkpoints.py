"""Checkpoint commands: `dsdpo export`, `dsdpo convert-checkpoint`, `dsdpo plot`."""

from __future__ import annotations

import click

from dsdpo.cli.common import trust_checkpoint_option


@click.command("export")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp32", "fp16"]),
    default="bf16",
    show_default=True,
    help="Precision of the written weights (training keeps fp32 master weights).",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest safetensors file; bigger models are split with an index.",
)
@trust_checkpoint_option
def export_command(checkpoint, out_dir, dtype, max_shard_size, trust_checkpoint):
    """Turn a training checkpoint into a Hugging Face folder: config, tokenizer, safetensors.

    CHECKPOINT is a step_NNNNNN folder, or a run's output folder (its newest complete checkpoint).
    Runs on the CPU, one shard in memory at a time. The folder loads with transformers'
    from_pretrained and with every dsdpo command.
    """
    from dsdpo.runtime.export import export_checkpoint

    out = export_checkpoint(
        checkpoint, out_dir, dtype=dtype, max_shard_size=max_shard_size, trust_checkpoint=trust_checkpoint
    )
    click.echo(f"exported {checkpoint} to {out}")


@click.command("convert-checkpoint")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@trust_checkpoint_option
def convert_checkpoint_command(checkpoint, out_dir, trust_checkpoint):
    """Make a checkpoint resumable on another number of ranks (DeepSpeed's universal format).

    CHECKPOINT is a step_NNNNNN folder (or a run folder: its newest). OUT_DIR defaults to
    CHECKPOINT_universal. Resume with `--resume OUT_DIR` on any number of ranks; keep
    train_batch_size (micro-batch × accumulation × ranks) the same so the data order continues.
    """
    from pathlib import Path

    from dsdpo.runtime.checkpoint import convert_to_universal
    from dsdpo.runtime.export import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir else folder.with_name(folder.name + "_universal")
    convert_to_universal(folder, out, trust_checkpoint=trust_checkpoint)
    click.echo(f"wrote a universal checkpoint to {out}; resume with --resume {out}")


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", default="curves.png", show_default=True, type=click.Path(dir_okay=False), help="Image file."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="A metric to draw (repeatable), e.g. loss, eval/rewards/accuracies; default: the loss, reward "
    "and drift curves and every held-out (eval/*) metric the runs logged.",
)
def plot_command(runs, out, metrics):
    """Training and held-out curves of one or more RUNS (output folders) side by side, one panel per
    metric (needs matplotlib: pip install 'dsdpo[plot]')."""
    from pathlib import Path

    from dsdpo.training.plot import plot_runs

    plot_runs([Path(run) for run in runs], Path(out), metrics)
    click.echo(f"wrote {out}")
