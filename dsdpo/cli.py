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


def model_options(command):
    """--model and the options that say how to load it; shared by every command that runs a model."""
    options = [
        click.option(
            "--model",
            "model_dir",
            required=True,
            type=click.Path(),
            help="A Hugging Face model folder (config.json, weights, tokenizer); nothing is downloaded.",
        ),
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
    for option in reversed(options):
        command = option(command)
    return command


def sampler_options(command):
    """The knobs of LLaDA's sampler (dsdpo.generate) and of batching."""
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
    for option in reversed(options):
        command = option(command)
    return command


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_for_sampling(model_dir, device, *, mask_token_id, trust_remote_code, dtype):
    """Model (eval mode, on `device`), tokenizer and mask token id; the mask token is checked first."""
    from dsdpo.models import load_config, load_model, load_tokenizer, resolve_mask_token_id

    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    mask_id = resolve_mask_token_id(mask_token_id, config, tokenizer)
    model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
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


@main.command("generate")
@model_options
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several.")
@click.option(
    "--data",
    type=click.Path(),
    help='A JSONL file of prompts, one a line: {"prompt": ...} (or {"question": ...}).',
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write {prompt, generation} JSONL here.")
@sampler_options
def generate_command(model_dir, device, prompts, data, out, **knobs):
    """Generate answers with LLaDA's sampler (block semi-autoregressive, low-confidence remasking).

    Prints each answer, separated by a line of dashes, or writes them to --out.
    """
    from dsdpo.errors import DsdpoError
    from dsdpo.generate import generate_text, read_prompts_jsonl

    if bool(prompts) == bool(data):
        raise DsdpoError("give prompts with --prompt or a file with --data, not both and not neither")
    texts = list(prompts) if prompts else read_prompts_jsonl(data)
    batch_size, chat = knobs.pop("batch_size"), knobs.pop("chat")
    model_knobs = {name: knobs.pop(name) for name in ("mask_token_id", "trust_remote_code", "dtype")}
    device = _resolve_device(device)
    sampler = _sampler_settings(**knobs, device=device)
    model, tokenizer, mask_id = _load_for_sampling(model_dir, device, **model_knobs)
    generations = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        generations += generate_text(model, tokenizer, batch, mask_token_id=mask_id, chat=chat, **sampler)
    if out:
        _write_jsonl(out, [{"prompt": p, "generation": g} for p, g in zip(texts, generations, strict=True)])
        click.echo(f"wrote {len(generations)} generations to {out}")
    else:
        click.echo("\n---\n".join(generations))


@main.group("eval", cls=DsdpoGroup)
def eval_group():
    """Evaluate a model: generation accuracy on math problems (and more commands to come)."""


@eval_group.command("accuracy")
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
              "generation, extracted, correct.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
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

    from dsdpo.accuracy import check_prompt_template, evaluate_accuracy
    from dsdpo.answers import load_problems_jsonl, load_reasoning_gym
    from dsdpo.errors import DsdpoError

    if bool(data) == bool(gym_name):
        raise DsdpoError("give problems with --data or --reasoning-gym, not both and not neither")
    if gym_name and limit is None:
        raise DsdpoError("--reasoning-gym needs --n, the number of problems to generate")
    check_prompt_template(prompt_template)
    batch_size, chat = knobs.pop("batch_size"), knobs.pop("chat")
    model_knobs = {name: knobs.pop(name) for name in ("mask_token_id", "trust_remote_code", "dtype")}
    device = _resolve_device(device)
    sampler = _sampler_settings(**knobs, device=device)
    if gym_name:
        problems = load_reasoning_gym(gym_name, limit, knobs["seed"])
    else:
        problems = load_problems_jsonl(data, limit)
    model, tokenizer, mask_id = _load_for_sampling(model_dir, device, **model_knobs)
    report = evaluate_accuracy(
        model, tokenizer, problems, mask_token_id=mask_id, sampler=sampler, batch_size=batch_size,
        prompt_template=prompt_template, chat=chat, out=out, progress=progress,
    )  # fmt: skip
    if json_out:
        with open(json_out, "w", encoding="utf-8") as sink:
            json.dump(report.as_dict(), sink, indent=2)
    click.echo(report.summary())


@main.command("export")
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
def export_command(checkpoint, out_dir, dtype, max_shard_size):
    """Turn a training checkpoint into a Hugging Face folder: config, tokenizer, safetensors.

    CHECKPOINT is a step_NNNNNN folder, or a run's output folder (its newest complete checkpoint).
    Runs on the CPU, one shard in memory at a time. The folder loads with transformers'
    from_pretrained and with every dsdpo command.
    """
    from dsdpo.export import export_checkpoint

    out = export_checkpoint(checkpoint, out_dir, dtype=dtype, max_shard_size=max_shard_size)
    click.echo(f"exported {checkpoint} to {out}")
