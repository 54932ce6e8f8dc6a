"""Scoring commands: `dsdpo score`, `dsdpo eval preference`, `dsdpo compare`, `dsdpo precompute-reference`."""

from __future__ import annotations

import click

from dsdpo.cli.common import (
    _resolve_device,
    _write_json,
    _write_jsonl,
    loading_options,
    model_options,
    with_options,
)
from dsdpo.config import ESTIMATORS, DataConfig, LossConfig, ScoreConfig

# The defaults training uses (dsdpo.config): a score made with them sees the masks training saw.
DATA, SCORE, LOSS = DataConfig(), ScoreConfig(), LossConfig()


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
            default=DATA.max_length,
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
            "--pad-responses-to",
            type=click.IntRange(min=1),
            default=None,
            help="Fill each response with EOS to this many tokens, as training's --pad-responses-to does "
            "(the scores of a precomputed reference must be padded as the run pads).",
        ),
        click.option(
            "--budget",
            default=SCORE.budget,
            show_default=True,
            help="Monte Carlo draws per response: the score's standard error shrinks as 1/sqrt(budget).",
        ),
        click.option(
            "--estimator",
            type=click.Choice(ESTIMATORS),
            default=SCORE.estimator,
            show_default=True,
            help="l_over_L: mask l of L tokens, weight L/l (LLaDA, lowest variance); one_over_t: mask "
            "with probability t, weight 1/t; trajectory: sum over unmasking steps.",
        ),
        click.option(
            "--trajectory-steps",
            "steps",
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
    return with_options(command, options)


def _score_settings(knobs: dict):
    """ScoreSettings from the score options of that name (checked before any model is loaded)."""
    from dataclasses import fields

    from dsdpo.evaluation.reports import ScoreSettings

    return ScoreSettings(**{f.name: knobs[f.name] for f in fields(ScoreSettings) if f.name in knobs})


def _load_scoring_inputs(model_dirs, knobs: dict):
    """Pairs (tokenised with the first model's tokenizer), the models (eval mode) and the mask token.

    The data and every folder's mask token are checked before any weights are loaded.
    """
    from dsdpo.data import load_preference_data, tokenize_pairs
    from dsdpo.errors import DsdpoError
    from dsdpo.models.loading import load_config, load_model, load_tokenizer, resolve_mask_token_id

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
    # The options training cuts and pads its data with (DataConfig.tokenize_options), taken by name.
    pairs, cuts = tokenize_pairs(
        examples, tokenizer, **{name: knobs[name] for name in DATA.tokenize_options()}
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


@click.command("preference")
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
    default=LOSS.type,
    show_default=True,
    help="The preference loss reported (sigmoid = DPO); any loss type of training (dsdpo.objective.losses).",
)
@click.option(
    "--beta", default=LOSS.beta, show_default=True, help="β of the implicit rewards r = β(B̂_θ − B̂_ref)."
)
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
    from dsdpo.evaluation.reports import evaluate_preference

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


@click.command("score")
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
    from dsdpo.evaluation.reports import score_pairs

    settings = _score_settings(knobs)
    pairs, models, ids = _load_scoring_inputs([model_dir], knobs)
    scores = score_pairs(models[0], pairs, **ids, settings=settings)
    _write_jsonl(out, scores.records())
    click.echo(f"wrote the scores of {len(pairs)} pairs ({2 * len(pairs)} responses) to {out}")


@click.command("compare")
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
    from dsdpo.evaluation.reports import compare_preference

    settings = _score_settings(knobs)
    pairs, (base, tuned), ids = _load_scoring_inputs([base_dir, tuned_dir], knobs)
    comparison = compare_preference(base, tuned, pairs, **ids, settings=settings, beta=beta)
    if json_out:
        _write_json(json_out, comparison.as_dict())
    click.echo(comparison.table())


@click.command("precompute-reference")
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
    --seed, --max-length, --max-prompt-length and --pad-responses-to, and give --dtype the training
    precision (bf16 for ds_configs/rtx4080*.json). Training checks each, the tokenizer and every
    pair's tokens, and names any difference.
    """
    from dsdpo.models.loading import load_tokenizer
    from dsdpo.reference.scores_file import precompute_reference_scores

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
