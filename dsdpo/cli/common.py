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


def sampler_options(command):
    """The knobs of LLaDA's sampler (dsdpo.generate), its seed, and batching."""
    return denoising_options(_seed_batch_chat_options(command))


def denoising_options(command):
    """How LLaDA's sampler (dsdpo.generate) denoises an answer."""
    options = [
        click.option(
            "--gen-length",
            default=128,
            show_default=True,
            help="Answer length in tokens; the answer starts fully masked, and text after EOS is dropped.",
        ),
        click.option(
            "--block-length",
            default=32,
            show_default=True,
            help="Blocks are decoded left to right (semi-autoregressive); gen-length must be a multiple. "
            "Equal to gen-length: the whole answer is one block.",
        ),
        click.option(
            "--steps",
            default=128,
            show_default=True,
            help="Denoising steps (model forwards) in all, split evenly over the blocks. "
            "Fewer steps reveal more tokens each: faster, usually worse. At most gen-length.",
        ),
        click.option(
            "--temperature",
            default=0.0,
            show_default=True,
            help="Sampling temperature of each proposed token (Gumbel-max); 0 takes the most likely token.",
        ),
        click.option(
            "--remasking",
            type=click.Choice(["low_confidence", "random"]),
            default="low_confidence",
            show_default=True,
            help="Which proposals to keep at each step: the most confident ones, or random ones.",
        ),
        click.option(
            "--cfg-scale",
            default=0.0,
            show_default=True,
            help="Classifier-free guidance: > 0 pushes away from a pass with the prompt masked "
            "(costs a second forward per step).",
        ),
    ]
    return with_options(command, options)


def _seed_batch_chat_options(command):
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
        click.option(
            "--chat/--no-chat",
            default=True,
            show_default=True,
            help="Wrap each prompt as a user turn with the tokenizer's chat template (when it has one). "
            "Use --no-chat for base models.",
        ),
    ]
    return with_options(command, options)


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


_LOADING_KNOBS = ("mask_token_id", "trust_remote_code", "trust_checkpoint", "dtype")


def _load_for_sampling(model_dir, device, *, mask_token_id, trust_remote_code, trust_checkpoint, dtype):
    """Model (eval mode, on `device`), tokenizer and mask token id; the mask token is checked first."""
    from dsdpo.models import load_config, load_model, load_tokenizer, resolve_mask_token_id

    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    mask_id = resolve_mask_token_id(mask_token_id, config, tokenizer)
    model = load_model(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, trust_checkpoint=trust_checkpoint
    )
    return model.to(device).eval(), tokenizer, mask_id


def _sampler_settings(gen_length, block_length, steps, temperature, remasking, cfg_scale, seed, device):
    """The keyword arguments of dsdpo.generate.generate, checked before any model is loaded."""
    import torch

    from dsdpo.generate import check_schedule

    check_schedule(gen_length, block_length, steps)
    return dict(
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        temperature=temperature,
        remasking=remasking,
        cfg_scale=cfg_scale,
        generator=torch.Generator(device=device).manual_seed(seed),
    )


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
