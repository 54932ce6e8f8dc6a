"""The `dsdpo` command line: a click group; each command imports its heavy modules when it runs.

The commands live by what they do: train (dsdpo.cli.train, built from the settings in dsdpo.config),
scoring and evaluation (score), generation (generate), data (data), checkpoints (checkpoints).
"""

from __future__ import annotations

import click

from dsdpo import __version__
from dsdpo.cli.checkpoints import convert_checkpoint_command, export_command, plot_command
from dsdpo.cli.common import DsdpoGroup
from dsdpo.cli.data import data_group, init_tiny_command, make_pairs_command
from dsdpo.cli.generate import eval_accuracy_command, generate_command
from dsdpo.cli.harness import eval_harness_command
from dsdpo.cli.plan import plan_cli
from dsdpo.cli.score import (
    compare_command,
    eval_preference_command,
    precompute_reference_command,
    score_command,
)
from dsdpo.cli.train import train_command


@click.group(cls=DsdpoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsdpo")
def main():
    """Preference optimisation (DPO and its family) for masked diffusion language models.

    `dsdpo train` trains (under DeepSpeed: `deepspeed launch/train.py`, the same options). The other
    commands build tiny models, score and evaluate models, and export checkpoints.
    """


@click.group("eval", cls=DsdpoGroup)
def eval_group():
    """Evaluate a model: preference metrics against a reference, generation accuracy on math problems,
    lm-evaluation-harness tasks.

    Related: `dsdpo score` writes per-response likelihood scores, `dsdpo compare` compares a base and
    a tuned model on the same draws.
    """


eval_group.add_command(eval_accuracy_command)
eval_group.add_command(eval_harness_command)
eval_group.add_command(eval_preference_command)
for command in (
    train_command, init_tiny_command, data_group, make_pairs_command, generate_command, eval_group,
    score_command, compare_command, precompute_reference_command, export_command,
    convert_checkpoint_command, plot_command, plan_cli,
):  # fmt: skip
    main.add_command(command)
