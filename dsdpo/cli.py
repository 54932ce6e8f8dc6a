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


TRUST_CHECKPOINT_HELP = (
    "Load a checkpoint whose shards hold pickled objects other than weights: loading them could run "
    "any code. Only for checkpoints from someone you trust; without it such a checkpoint is refused."
)


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
    for option in reversed(options):
        command = option(command)
    return command


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
    for option in reversed(options):
        command = option(command)
    return command


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
    for option in reversed(options):
        command = option(command)
    return command


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


@main.command("make-pairs")
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
@click.option("--chat", is_flag=True, help="Write conversational rows ({role, content} messages).")
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
@denoising_options
def make_pairs_command(source, out, num, seed, mix, pairs_per_problem, chat, **model_source):
    """Write reasoning preference pairs: chosen = a correct worked solution, rejected = a labelled variant.

    Every pair is checked: chosen reaches the correct final answer, wrong kinds (wrong_arithmetic,
    truncated_chain) do not, flawed kinds (missing_step, verbose) keep it.

    With --source model, the pairs are on-policy: --model samples --samples answers per problem of
    --problems (sampler options as in `dsdpo generate`, with --temperature > 0), each is judged as
    `dsdpo eval accuracy` judges, and a problem with a right and a wrong answer gives a pair
    (chosen: right, rejected: wrong). --chat wraps prompts in the chat template and writes them as
    user turns.
    """
    if source == "model":
        _make_on_policy_pairs(out, num, seed, chat, **model_source)
        return
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
    click.echo(f"wrote {len(rows)} pairs from {len(problems)} problems to {out} ({summary})")
    if skipped:
        click.echo("skipped problems: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))


def _make_on_policy_pairs(
    out, num, seed, chat, *, model_dir, problems, samples, prompt_template, batch_size, **knobs
):
    from dsdpo.accuracy import check_prompt_template
    from dsdpo.answers import load_problems_jsonl, load_reasoning_gym
    from dsdpo.data.reasoning.pairs import write_jsonl
    from dsdpo.errors import DsdpoError
    from dsdpo.on_policy import check_diversity, on_policy_pairs

    if not model_dir or not problems:
        raise DsdpoError("--source model needs --model DIR and --problems FILE (or reasoning-gym:NAME)")
    if samples < 2:
        raise DsdpoError(f"--samples must be at least 2 (a right and a wrong answer), got {samples}")
    check_prompt_template(prompt_template)
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
    device = _resolve_device(knobs.pop("device"))
    sampler = _sampler_settings(**knobs, seed=seed, device=device)
    check_diversity(samples, sampler)  # before any model is loaded
    if problems.startswith("reasoning-gym:"):
        if num is None:
            raise DsdpoError("--problems reasoning-gym:NAME needs --num, the number of problems")
        problem_list = load_reasoning_gym(problems.split(":", 1)[1], num, seed)
    else:
        problem_list = load_problems_jsonl(problems, num)
    model, tokenizer, mask_id = _load_for_sampling(model_dir, device, **model_knobs)
    rows, counts = on_policy_pairs(
        model, tokenizer, problem_list, mask_token_id=mask_id, sampler=sampler, samples=samples,
        batch_size=batch_size, prompt_template=prompt_template, chat=chat,
    )  # fmt: skip
    write_jsonl(rows, out)
    click.echo(
        f"wrote {counts['pairs']} pairs from {counts['problems']} problems to {out} "
        f"({counts['correct_samples']}/{counts['samples']} answers right; no pair: "
        f"{counts.get('all_correct', 0)} always right, {counts.get('all_wrong', 0)} always wrong, "
        f"{counts.get('no_usable_wrong', 0)} wrong only with empty answers)"
    )


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
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
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
    """Evaluate a model: preference metrics against a reference, generation accuracy on math problems.

    Related: `dsdpo score` writes per-response likelihood scores, `dsdpo compare` compares a base and
    a tuned model on the same draws.
    """


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
    model_knobs = {name: knobs.pop(name) for name in _LOADING_KNOBS}
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
@trust_checkpoint_option
def export_command(checkpoint, out_dir, dtype, max_shard_size, trust_checkpoint):
    """Turn a training checkpoint into a Hugging Face folder: config, tokenizer, safetensors.

    CHECKPOINT is a step_NNNNNN folder, or a run's output folder (its newest complete checkpoint).
    Runs on the CPU, one shard in memory at a time. The folder loads with transformers'
    from_pretrained and with every dsdpo command.
    """
    from dsdpo.export import export_checkpoint

    out = export_checkpoint(
        checkpoint, out_dir, dtype=dtype, max_shard_size=max_shard_size, trust_checkpoint=trust_checkpoint
    )
    click.echo(f"exported {checkpoint} to {out}")


def score_options(command):
    """The keyed Monte Carlo draws of the ELBO scores, batching, and the preference data they score."""
    options = [
        click.option(
            "--data",
            required=True,
            type=click.Path(),
            help="Preference pairs: .jsonl, .json, .parquet or a datasets folder with prompt, chosen, "
            "rejected (and optional id) per row.",
        ),
        click.option("--split", default=None, help="Split of a datasets folder (default: train)."),
        click.option(
            "--max-length",
            default=1024,
            show_default=True,
            help="Prompt + response tokens at most; longer pairs are cut as in training (same default).",
        ),
        click.option("--max-prompt-length", type=int, default=None, help="Prompt tokens at most."),
        click.option(
            "--refuse-long-prompts",
            is_flag=True,
            help="A prompt that fills --max-length is an error (as in training); default: its start is "
            "cut so the response fits, and counted.",
        ),
        click.option(
            "--skip-invalid", is_flag=True, help="Count bad rows and long prompts instead of stopping."
        ),
        click.option(
            "--budget",
            default=8,
            show_default=True,
            help="Monte Carlo draws per response: the score's standard error shrinks as 1/sqrt(budget).",
        ),
        click.option(
            "--estimator",
            type=click.Choice(["l_over_L", "one_over_t", "trajectory"]),
            default="l_over_L",
            show_default=True,
            help="l_over_L: mask l of L tokens, weight L/l (LLaDA, lowest variance); one_over_t: mask "
            "with probability t, weight 1/t; trajectory: sum over unmasking steps.",
        ),
        click.option(
            "--trajectory-steps",
            type=int,
            default=None,
            help="Unmasking steps T of the trajectory estimator (default: the response length).",
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            help="Seed of the draws, keyed as training keys them: use the training seed to see its masks.",
        ),
        click.option(
            "--max-tokens-per-forward",
            type=int,
            default=None,
            help="Cap on rows × sequence length per forward call (memory); default: one call per batch.",
        ),
        click.option("--batch-size", default=8, show_default=True, help="Pairs scored together."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _score_settings(knobs: dict):
    """ScoreSettings from the score options of that name (checked before any model is loaded)."""
    from dataclasses import fields

    from dsdpo.evaluate import ScoreSettings

    return ScoreSettings(**{f.name: knobs[f.name] for f in fields(ScoreSettings) if f.name in knobs})


def _load_scoring_inputs(model_dirs, knobs: dict):
    """Pairs (tokenised with the first model's tokenizer), the models (eval mode) and the mask token.

    The data and every folder's mask token are checked before any weights are loaded.
    """
    from dsdpo.data import load_preference_data, tokenize_pairs
    from dsdpo.errors import DsdpoError
    from dsdpo.models import load_config, load_model, load_tokenizer, resolve_mask_token_id

    examples, skipped = load_preference_data(
        knobs["data"], split=knobs["split"], skip_invalid=knobs["skip_invalid"]
    )
    trust, explicit = knobs["trust_remote_code"], knobs["mask_token_id"]
    tokenizer = load_tokenizer(model_dirs[0], trust_remote_code=trust)
    mask_ids = []
    for folder in model_dirs:
        folder_tokenizer = (
            tokenizer if folder == model_dirs[0] else load_tokenizer(folder, trust_remote_code=trust)
        )
        config = load_config(folder, trust_remote_code=trust)
        mask_ids.append(resolve_mask_token_id(explicit, config, folder_tokenizer))
    if len(set(mask_ids)) > 1:
        raise DsdpoError(
            f"the models disagree on the mask token ({', '.join(map(str, mask_ids))}): "
            "they must share a tokenizer to be compared"
        )
    if tokenizer.pad_token_id is None:
        raise DsdpoError(f"{model_dirs[0]}: the tokenizer has no pad token")
    pairs, cuts = tokenize_pairs(
        examples,
        tokenizer,
        max_length=knobs["max_length"],
        max_prompt_length=knobs["max_prompt_length"],
        skip_invalid=knobs["skip_invalid"],
        refuse_long_prompts=knobs["refuse_long_prompts"],
    )
    _report_data_changes(knobs["data"], {**skipped, **cuts})
    device = _resolve_device(knobs["device"])
    models = [
        load_model(
            folder, dtype=knobs["dtype"], trust_remote_code=trust, trust_checkpoint=knobs["trust_checkpoint"]
        )
        .to(device)
        .eval()
        for folder in model_dirs
    ]
    return pairs, models, dict(mask_token_id=mask_ids[0], pad_token_id=tokenizer.pad_token_id)


def _report_data_changes(source, counts: dict[str, int]) -> None:
    """One stderr line for rows skipped or cut, so a score is never silently of other text."""
    changed = {kind: count for kind, count in counts.items() if count}
    if changed:
        click.echo(f"{source}: " + ", ".join(f"{kind} {count}" for kind, count in changed.items()), err=True)


def _write_json(path, data) -> None:
    import json

    with open(path, "w", encoding="utf-8") as sink:
        json.dump(data, sink, indent=2)
        sink.write("\n")


@eval_group.command("preference")
@model_options
@click.option(
    "--ref",
    "ref_dir",
    type=click.Path(),
    default=None,
    help="The reference model folder (loaded like --model). Without it: reference-free rewards.",
)
@score_options
@click.option(
    "--loss",
    "loss_type",
    default="sigmoid",
    show_default=True,
    help="The preference loss reported (sigmoid = DPO); any loss type of training (dsdpo/loss.py).",
)
@click.option("--beta", default=0.1, show_default=True, help="β of the implicit rewards r = β(B̂_θ − B̂_ref).")
@click.option("--label-smoothing", default=0.0, show_default=True, help="ε of the cdpo and robust losses.")
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Also write the report as JSON here."
)
def eval_preference_command(model_dir, ref_dir, loss_type, beta, label_smoothing, json_out, **knobs):
    """Reward accuracy, margin, implicit rewards, loss and the scores' standard errors on preference pairs.

    The policy (--model) and the reference (--ref) score every response on the same keyed draws, so
    their difference is free of the noise they share. Reward accuracy counts pairs whose chosen reward
    beats the rejected one (a tie is not a win).
    """
    from dsdpo.evaluate import evaluate_preference
    from dsdpo.loss import LossConfig

    loss = LossConfig(
        type=loss_type, beta=beta, label_smoothing=label_smoothing, reference_free=ref_dir is None
    )
    settings = _score_settings(knobs)
    folders = [model_dir] if ref_dir is None else [model_dir, ref_dir]
    pairs, models, ids = _load_scoring_inputs(folders, knobs)
    reference = models[1] if ref_dir is not None else None
    report = evaluate_preference(models[0], reference, pairs, **ids, loss=loss, settings=settings)
    if json_out:
        _write_json(json_out, report.as_dict())
    click.echo(report.table())


@main.command("score")
@model_options
@score_options
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Where the JSONL scores are written."
)
def score_command(model_dir, out, **knobs):
    """Write each pair's ELBO estimates and their standard errors to JSONL, one row per pair:

    {"id", "chosen_elbo", "chosen_std_error", "rejected_elbo", "rejected_std_error"}

    An ELBO is the mean of --budget keyed draws; its standard error is their sample std / sqrt(budget)
    (null with --budget 1). Draws are keyed as in training (seed, "<id>:chosen"/"<id>:rejected", epoch 0).
    """
    from dsdpo.evaluate import score_pairs

    settings = _score_settings(knobs)
    pairs, models, ids = _load_scoring_inputs([model_dir], knobs)
    scores = score_pairs(models[0], pairs, **ids, settings=settings)
    _write_jsonl(out, scores.records())
    click.echo(f"wrote the scores of {len(pairs)} pairs ({2 * len(pairs)} responses) to {out}")


@main.command("compare")
@click.option("--base", "base_dir", required=True, type=click.Path(), help="The base model folder.")
@click.option("--tuned", "tuned_dir", required=True, type=click.Path(), help="The tuned model folder.")
@loading_options
@score_options
@click.option("--beta", default=0.1, show_default=True, help="β of the reported DPO margin.")
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Also write the comparison as JSON."
)
def compare_command(base_dir, tuned_dir, beta, json_out, **knobs):
    """Base versus tuned on the same preference pairs and the same draws, pair by pair.

    For each pair and model, gap = ELBO(chosen) − ELBO(rejected); a model is right on a pair when its
    gap is > 0. Reported: each model's accuracy and mean gap, and the mean of the paired differences
    (tuned − base) of correctness, gap and β·gap (the DPO reward margin of tuned with base as the
    reference), each with a 95% confidence interval mean ± 1.96·sd/sqrt(pairs) (normal approximation
    over pairs; the draw noise is in the per-pair values).
    """
    from dsdpo.evaluate import compare_preference

    settings = _score_settings(knobs)
    pairs, (base, tuned), ids = _load_scoring_inputs([base_dir, tuned_dir], knobs)
    comparison = compare_preference(base, tuned, pairs, **ids, settings=settings, beta=beta)
    if json_out:
        _write_json(json_out, comparison.as_dict())
    click.echo(comparison.table())


@main.command("precompute-reference")
@click.option("--ref", "ref_dir", required=True, type=click.Path(), help="The reference model folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The scores file (safetensors).")
@click.option(
    "--epochs",
    default=1,
    show_default=True,
    help="Epochs to cover: the draws change every epoch, so give the training run's number of epochs.",
)
@loading_options
@score_options
def precompute_reference_command(ref_dir, out, epochs, **knobs):
    """Score the reference once, so that training needs no reference model in memory.

    Writes every pair's per-draw reference terms for each epoch, keyed exactly as training keys its
    draws. Train with `--reference-scores OUT` and the same --budget, --estimator, --trajectory-steps,
    --seed, --max-length and --max-prompt-length, and give --dtype the training precision (bf16 for
    ds_configs/rtx4080*.json). Training checks each, the tokenizer and every pair's tokens, and names
    any difference.
    """
    from dsdpo.models import load_tokenizer
    from dsdpo.reference import precompute_reference_scores

    settings = _score_settings(knobs)  # checks the draw options before any model is loaded
    pairs, models, ids = _load_scoring_inputs([ref_dir], knobs)
    path = precompute_reference_scores(
        models[0],
        pairs,
        out,
        settings=settings,
        max_length=knobs["max_length"],
        max_prompt_length=knobs["max_prompt_length"],
        dtype=knobs["dtype"],
        tokenizer=load_tokenizer(ref_dir, trust_remote_code=knobs["trust_remote_code"]),
        epochs=epochs,
        source=str(ref_dir),
        **ids,
    )
    click.echo(f"wrote the reference terms of {len(pairs)} pairs × {epochs} epochs to {path}")


@main.command("convert-checkpoint")
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

    from dsdpo.checkpoint import convert_to_universal
    from dsdpo.export import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir else folder.with_name(folder.name + "_universal")
    convert_to_universal(folder, out, trust_checkpoint=trust_checkpoint)
    click.echo(f"wrote a universal checkpoint to {out}; resume with --resume {out}")


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", default="curves.png", show_default=True, type=click.Path(dir_okay=False), help="Image file."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="A metric to draw (repeatable), e.g. loss, eval/rewards/accuracies; default: the loss, reward "
    "and held-out metrics the runs logged.",
)
def plot_command(runs, out, metrics):
    """Training and held-out curves of one or more RUNS (output folders) side by side, one panel per
    metric (needs matplotlib: pip install 'dsdpo[plot]')."""
    from pathlib import Path

    from dsdpo.plot import plot_runs

    plot_runs([Path(run) for run in runs], Path(out), metrics)
    click.echo(f"wrote {out}")


from dsdpo.planner.command import plan_cli  # noqa: E402 (`dsdpo plan`, dsdpo/planner)

main.add_command(plan_cli)
