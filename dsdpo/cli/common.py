"""What the dsdpo commands share: errors as one line, model loading, sampler and seed options."""

from __future__ import annotations

import click

from dsdpo.errors import DsdpoError


class DsdpoGroup(click.Group):
    """Turns a DsdpoError into click's one-line 'Error: ...' and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DsdpoError as err:
            raise click.ClickException(str(err)) from None


TRUST_CHECKPOINT_HELP = (
    "Load a checkpoint whose shards hold pickled objects other than weights: loading them could run "
    "any code. Only for checkpoints from someone you trust; without it such a checkpoint is refused."
)


def with_options(command, options: list):
    """Apply click option decorators in the order listed (the first becomes the first in --help)."""
    for option in reversed(options):
        command = option(command)
    return command


def trust_checkpoint_option(command):
    return click.option("--trust-checkpoint", is_flag=True, help=TRUST_CHECKPOINT_HELP)(command)


def loading_options(command):
    """How a model folder (or a checkpoint) is loaded (mask token, remote code, trust, precision,
    device); shared by every command that runs a model."""
    options = [
        click.option(
            "--mask-token-id",
            type=int,
            default=None,
            help="The mask token id, when neither the config nor the tokenizer names it (LLaDA: 126336).",
        ),
        click.option(
            "--trust-remote-code",
            is_flag=True,
            help="Run the model folder's own Python code (needed by LLaDA and Dream); only for folders "
            "you trust.",
        ),
        trust_checkpoint_option,
        click.option(
            "--dtype",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="Precision of the weights; bf16 halves memory on a GPU.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="Where the model runs: cpu, cuda, cuda:1 ...; auto picks cuda when there is one.",
        ),
    ]
    return with_options(command, options)


def model_options(command):
    """--model and the options that say how to load it."""
    command = loading_options(command)
    return click.option(
        "--model",
        "model_dir",
        required=True,
        type=click.Path(),
        help="A Hugging Face model folder (config.json, weights, tokenizer); nothing is downloaded.",
    )(command)


def _attach(option: click.Option):
    """A decorator adding a built click.Option to a command function (as click.option does)."""

    def decorator(command):
        command.__dict__.setdefault("__click_params__", []).append(option)
        return command

    return decorator


def sampler_settings_options(command):
    """The sampler's settings (dsdpo.config.SamplerConfig: --gen-length ... --chat/--no-chat), with
    the help and defaults every generating command shares; read back with `sampler_settings`."""
    from dsdpo.cli.schema import section_options
    from dsdpo.config import SamplerConfig

    options = section_options(SamplerConfig, "sampler", names="field")
    return with_options(command, [_attach(option) for option in options])


def sampler_options(command):
    """The sampler's settings, its seed, and batching."""
    options = [
        click.option(
            "--seed",
            default=0,
            show_default=True,
            help="Seed of the sampler's random numbers (and of --reasoning-gym's problems).",
        ),
        click.option(
            "--batch-size", default=8, show_default=True, help="Prompts generated together in one batch."
        ),
        sampler_settings_options,
    ]
    return with_options(command, options)


def sampler_settings(knobs: dict):
    """Take the sampler's options out of a command's keyword arguments: the SamplerConfig given
    (fields not given are decided by the model, dsdpo.evaluation.sampler.sampler_for), checked before any
    model
    is loaded."""
    from dataclasses import fields

    from dsdpo.config import SamplerConfig

    given = {spec.name: knobs.pop(spec.name) for spec in fields(SamplerConfig)}
    return SamplerConfig(**{name: value for name, value in given.items() if value is not None}).validate()


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


_LOADING_KNOBS = ("mask_token_id", "trust_remote_code", "trust_checkpoint", "dtype")


def _load_for_sampling(
    model_dir, device, settings, *, mask_token_id, trust_remote_code, trust_checkpoint, dtype
):
    """Model (eval mode, on `device`), tokenizer, mask token id and the sampler's settings resolved
    for this model (said on stderr); the mask token and the settings are checked before the weights
    are read."""
    from dsdpo.evaluation.sampler import sampler_for
    from dsdpo.models.loading import load_config, load_model, load_tokenizer, resolve_mask_token_id

    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    mask_id = resolve_mask_token_id(mask_token_id, config, tokenizer)
    settings = sampler_for(settings, config, tokenizer)
    model = load_model(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, trust_checkpoint=trust_checkpoint
    )
    click.echo(settings.summary(), err=True)  # once the weights load: a refused model is one line
    return model.to(device).eval(), tokenizer, mask_id, settings


def _generator(seed: int, device: str):
    """The sampler's one source of random numbers."""
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _write_jsonl(path, records) -> None:
    import json

    with open(path, "w", encoding="utf-8") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")


def _write_json(path, data) -> None:
    import json

    with open(path, "w", encoding="utf-8") as sink:
        json.dump(data, sink, indent=2)
        sink.write("\n")
