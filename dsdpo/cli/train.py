"""`dsdpo train` (and `deepspeed launch/train.py`, a shim over it): options -> typed config -> training.

Every config field is an option, built here from its definition in dsdpo.config (help, default and
choices in the field's metadata), so a setting is written once. Options come from --config (YAML or
JSON with sections model, data, score, loss, train), then the flags, then --set section.field=value;
later wins. A flag not given leaves the file's value alone. DeepSpeed settings (ZeRO, offload,
precision) live only in the --ds_config JSON; learning rate, schedule and batch options fill its "auto"
values (a number there and the option too is an error).
"""

from __future__ import annotations

import os
import sys
import typing
import warnings
from pathlib import Path

import click

from dsdpo.cli.schema import section_options
from dsdpo.config import SECTIONS, Config

REPO = Path(__file__).resolve().parents[2]
# A section whose options carry a prefix: the held-out sampler's --eval-gen-length ... --eval-chat.
PREFIXES = {"eval_sampler": "eval-"}


def schema_options() -> list[tuple[str, str, click.Option]]:
    """(section.field, parameter name, click option) for every field of every config section."""
    options = []
    for section, cls in typing.get_type_hints(Config).items():
        for option in section_options(cls, section, prefix=PREFIXES.get(section, "")):
            options.append((f"{section}.{option.name.partition('__')[2]}", option.name, option))
    return options


SCHEMA_OPTIONS = schema_options()
assert {section for section, *_ in (o[0].split(".") for o in SCHEMA_OPTIONS)} == set(SECTIONS)


def build_config(values: dict, *, config_file: str | None, assignments: list[str], demo: bool):
    """The typed config: the file, the demo's settings, the flags given, then --set; and the
    DeepSpeed config the demo picks."""
    from dsdpo.config import apply_overrides, config_from_dict, load_config_file, parse_assignments

    data = load_config_file(config_file) if config_file else {}
    source = config_file or "command line"
    ds_config = None
    if demo:
        from dsdpo.training.demo import prepare_demo

        output = Path(values["train__output"] or "runs/demo")
        model_dir, data_file = prepare_demo(output / "inputs")
        data = apply_overrides(
            data,
            {
                "model.path": str(model_dir),
                "data.path": str(data_file),
                "train.output": str(output),
                "train.overwrite": True,  # the demo starts afresh each time
                "train.epochs": 3,
                "loss.beta": 0.5,
                "score.budget": 4,
            },
        )
        ds_config = str(REPO / "ds_configs" / "cpu.json")
    data = apply_overrides(data, {dotted: values[name] for dotted, name, _ in SCHEMA_OPTIONS})
    data = apply_overrides(data, parse_assignments(assignments))
    return config_from_dict(data, source).validate(), ds_config


def _train(
    ds_config, config_file, assignments, resume, trust_checkpoint, nvme_path, demo, local_rank, **values
):
    """Train a masked diffusion LM on preference pairs with DeepSpeed ZeRO-3.

    \b
        deepspeed launch/train.py --ds_config ds_configs/rtx4080.json --model DIR --data FILE --output DIR
        deepspeed --num_gpus 8 launch/train.py ...          # several GPUs: the same command
        python launch/train.py --demo                        # tiny model, built-in data, CPU, a minute
        dsdpo train --demo                                   # the same, as a dsdpo command

    Options come from --config (YAML or JSON with sections model, data, score, loss, train,
    eval_sampler), then the flags below, then --set section.field=value; later wins. DeepSpeed settings
    (ZeRO, offload, precision) live only in the --ds_config JSON; the learning rate, schedule, warmup,
    weight decay and batch options below fill its "auto" values (a number there and the option too is
    an error).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's collective deprecations
    from dsdpo.errors import DsdpoError

    try:
        config, demo_ds_config = build_config(
            values, config_file=config_file, assignments=list(assignments), demo=demo
        )
        ds_config = ds_config or demo_ds_config
        if not ds_config:
            raise DsdpoError("--ds_config is required (e.g. ds_configs/rtx4080.json), or use --demo")
        from dsdpo.training.loop import train
        from dsdpo.training.stopping import TrainingStopped

        try:
            metrics = train(
                config, ds_config, nvme_path=nvme_path, resume=resume, trust_checkpoint=trust_checkpoint
            )
        except TrainingStopped as stopped:
            print(str(stopped), file=sys.stderr)
            sys.exit(130)  # the shell's code for "interrupted"
    except DsdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        shown = ("loss", "rewards/accuracies", "rewards/margins")
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        print(f"done: {summary}; output in {config.train.output}")


RUN_OPTIONS = [
    click.Option(
        ["--ds_config", "--deepspeed_config", "ds_config"],
        help="DeepSpeed JSON (ds_configs/rtx4080.json, rtx4080_nvme.json, cpu.json, multi_gpu.json)",
    ),
    click.Option(
        ["--config", "config_file"],
        help="training config file, YAML or JSON, with sections model/data/score/loss/train",
    ),
    click.Option(
        ["--set", "assignments"],
        multiple=True,
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set score.budget=4 (repeatable)",
    ),
    click.Option(
        ["--resume"],
        metavar="auto|PATH",
        help="auto: continue from the newest complete checkpoint in --output (fresh start if none); "
        "PATH: from that checkpoint folder",
    ),
    click.Option(
        ["--trust-checkpoint"],
        is_flag=True,
        help="let the --resume checkpoint (and a checkpoint given as --model or --ref-model) hold pickled "
        "code, not only weights (it could run anything): only for checkpoints from someone you trust",
    ),
    click.Option(["--nvme-path"], help='folder on a fast NVMe drive, for configs that offload to "nvme"'),
    click.Option(
        ["--demo"], is_flag=True, help="train a tiny model on built-in addition pairs (CPU, about a minute)"
    ),
    click.Option(["--local_rank", "local_rank"], type=int, default=None, hidden=True),  # from the launcher
]

train_command = click.Command(
    "train",
    callback=_train,
    params=[*RUN_OPTIONS, *(option for _, _, option in SCHEMA_OPTIONS)],
    help=_train.__doc__,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
