"""A run's set-up: plan_run reads and checks every input before the distributed start-up (batch sizes,
data, model, held-out sets, DeepSpeed config, the checkpoint to resume, the starting weights) into a
RunPlan, so that a wrong option fails in seconds, not after the engines load; step_batches cuts the
plan's batches into micro-batches; prepare_output readies the output folder once the engines run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsdpo.config import Config
from dsdpo.data import PairBatcher, load_preference_data, tokenize_pairs
from dsdpo.data.rows import examples_digest
from dsdpo.errors import DsdpoError
from dsdpo.models.loading import (
    check_finite_weights,
    check_model_folder,
    load_config,
    load_tokenizer,
    resolve_mask_token_id,
)
from dsdpo.models.start import StartModels
from dsdpo.objective.sft import pad_completions_with_eos
from dsdpo.planner.shapes import largest_parameter
from dsdpo.reference.interface import PrecomputedReference
from dsdpo.reference.scores_file import ReferenceSettings
from dsdpo.runtime.checkpoint import check_checkpoint, find_resume_checkpoint, is_universal
from dsdpo.runtime.dist import launcher_rank_and_world
from dsdpo.runtime.ds_config import (
    fill_training_options,
    precision,
    read_ds_config,
    resolve_batch_sizes,
    resolve_ds_config,
    schedule_summary,
)
from dsdpo.runtime.run_folder import (
    ABANDONED,
    METRICS_FILE,
    check_fresh_output,
    check_writable,
    clear_run,
    cut_metrics_to,
    set_aside_later_checkpoints,
)


@dataclass
class RunPlan:
    """Everything a run needs that can be read and checked before the (slow) distributed start-up."""

    output: Path
    rank: int
    world_size: int
    tokenizer: Any
    hf_config: Any
    mask_token_id: int
    batcher: PairBatcher
    batch_sizes: dict[str, int]
    total_steps: int
    ds_config: dict[str, Any]
    reference_scores: PrecomputedReference | None
    checkpoint: Path | None
    data_digest: str  # examples_digest of the data: a checkpoint records it, a resume checks it
    summary: str
    eval_pairs: list | None = None  # held-out pairs, tokenised as the training pairs are
    eval_problems: list | None = None  # --eval-problems: held-out problems (dsdpo.evaluation.answers.Problem)
    notes: list[str] = field(default_factory=list)  # said once the run's log is open
    model_folder: Path | None = None  # the folder of config.json and the tokenizer (a checkpoint's hf/)
    start_models: StartModels | None = None  # the folders the engines load (a checkpoint's export)


def plan_run(
    config: Config,
    ds_config_path,
    *,
    nvme_path: str | None,
    resume: str | None,
    trust_checkpoint: bool = False,
) -> RunPlan:
    """Load and check every input before DeepSpeed and the model start, the quick checks first: the
    batch sizes, the data (enough pairs for one optimizer step), the model and its tokenizer, the
    held-out sets, the DeepSpeed config, the checkpoint to resume, then a checkpoint given as --model
    or --ref-model (exported for loading), and last the starting weights (every one finite)."""
    config.validate()
    rank, ranks = launcher_rank_and_world()
    output = Path(config.train.output)
    raw_ds_config = read_ds_config(ds_config_path)
    lora = bool(config.model.lora_rank)  # the "auto" rate and decay of adapters (LORA_AUTO_DEFAULTS)
    batch_sizes = resolve_batch_sizes(
        fill_training_options(raw_ds_config, config.train, str(ds_config_path), lora=lora),
        ranks,
        str(ds_config_path),
    )
    examples, skipped = load_preference_data(
        config.data.path, skip_invalid=config.data.skip_invalid, completions=config.loss.supervised
    )
    _check_one_step(config, len(examples), batch_sizes, ds_config_path)
    model_folder = check_model_folder(config.model.path)
    if config.model.reference_path:
        check_model_folder(config.model.reference_path)
    tokenizer = load_tokenizer(config.model.path, trust_remote_code=config.model.trust_remote_code)
    hf_config = load_config(config.model.path, trust_remote_code=config.model.trust_remote_code)
    mask_token_id = resolve_mask_token_id(config.model.mask_token_id, hf_config, tokenizer)
    notes = _resolve_eval_sampler(config, hf_config, tokenizer, examples, is_rank0=rank == 0)
    pairs, truncated = tokenize_pairs(examples, tokenizer, **config.data.tokenize_options())
    pairs = _sft_canvas(config, pairs, tokenizer)
    _check_one_step(config, len(pairs), batch_sizes, ds_config_path)  # rows skipped or dropped

    eval_pairs = _held_out_pairs(config, tokenizer, {pair.example_id for pair in pairs})
    eval_problems = _held_out_problems(config)
    _check_draws_fit(config, batch_sizes["train_micro_batch_size_per_gpu"])
    # The batcher's global batch is a whole optimizer step (see step_batches).
    per_rank_step = batch_sizes["train_micro_batch_size_per_gpu"] * batch_sizes["gradient_accumulation_steps"]
    batcher = PairBatcher(pairs, per_rank_step, seed=config.train.seed, world_size=ranks, rank=rank)
    # --max-steps, when given, is the run's length and the schedule's, however many epochs it takes
    # (as Hugging Face's Trainer); else --epochs passes over the data.
    total_steps = config.train.max_steps or config.train.epochs * len(batcher)
    ds_config = resolve_ds_config(
        raw_ds_config,
        world_size=ranks,
        total_steps=total_steps,
        options=config.train,
        nvme_path=nvme_path,
        largest_parameter=largest_parameter(hf_config),
        source=str(ds_config_path),
        lora=lora,
    )
    reference_scores = _precomputed_reference(
        config, pairs, tokenizer, precision(ds_config), -(-total_steps // len(batcher))
    )
    if reference_scores is not None and eval_pairs is not None:
        reference_scores.check_held_out(eval_pairs, config.train.eval_data)
    data_digest = examples_digest(examples)
    check_writable(output)
    checkpoint, resume_note = find_resume_checkpoint(output, resume) if resume else (None, None)
    if not resume:
        check_fresh_output(output, overwrite=config.train.overwrite)
    if checkpoint is not None:
        _check_resume_data(checkpoint, config.data.path, data_digest)
    if checkpoint is not None and is_universal(checkpoint):
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    start_models = StartModels.of(config.model, precision(ds_config), trust_checkpoint=trust_checkpoint)
    # Reads every weight, the last check; of the folder the engines load: a checkpoint's hf/ holds no
    # weights (they are in its ZeRO shards), its export does.
    check_finite_weights(start_models.model_config.path)
    summary = (
        f"{len(pairs)} pairs (rows skipped: {skipped or 'none'}; truncated: {truncated}), "
        f"{total_steps} steps of {batch_sizes['train_batch_size']} pairs, {schedule_summary(ds_config)}"
    )
    return RunPlan(
        output=output,
        rank=rank,
        world_size=ranks,
        tokenizer=tokenizer,
        hf_config=hf_config,
        mask_token_id=mask_token_id,
        batcher=batcher,
        batch_sizes=batch_sizes,
        total_steps=total_steps,
        ds_config=ds_config,
        reference_scores=reference_scores,
        checkpoint=checkpoint,
        data_digest=data_digest,
        summary=summary,
        notes=[*notes, *start_models.notes, *([resume_note] if resume_note else [])],
        eval_pairs=eval_pairs,
        eval_problems=eval_problems,
        model_folder=model_folder,
        start_models=start_models,
    )


def step_batches(batcher: PairBatcher, micro_batch: int) -> Iterator[tuple[int, list[list]]]:
    """(epoch, micro-batches) for every optimizer step, forever.

    The batcher yields each step's pairs for this rank (its global batch is the whole step:
    train_batch_size pairs). Cutting them into micro-batches here means the same pairs make a step
    however they are spread over ranks and accumulation: 2 ranks × 2 micro-batches of 1 pair see the
    pairs that 1 rank × 4 micro-batches, or 1 micro-batch of 4, sees.
    """
    while True:
        batcher.roll_over_finished_epoch()
        epoch = batcher.epoch
        for pairs in batcher:
            yield epoch, [pairs[start : start + micro_batch] for start in range(0, len(pairs), micro_batch)]


def _check_one_step(config: Config, count: int, batch_sizes: dict[str, int], ds_config_path) -> None:
    """The data holds at least one optimizer step of pairs (counted when read, and once tokenised)."""
    if count < batch_sizes["train_batch_size"]:
        raise DsdpoError(
            f"{config.data.path}: {count} pairs make no optimizer step of "
            f"{batch_sizes['train_batch_size']} pairs (train_batch_size in {ds_config_path})"
        )


def _resolve_eval_sampler(
    config: Config, hf_config, tokenizer, examples: list, *, is_rank0: bool
) -> list[str]:
    """The held-out sampler's settings for this model, every field set (the model family's published
    schedule, the chat template when the tokenizer has one: dsdpo.evaluation.sampler.sampler_for) as
    train_config.yaml then records them; --pad-responses-to auto as its gen length. A warning (now,
    before the start-up) when the held-out problems' prompts are given otherwise than the training
    prompts: conversational rows are rendered with the chat template, plain ones as they are."""
    from dsdpo.evaluation.sampler import sampler_for

    config.eval_sampler = sampler_for(config.eval_sampler, hf_config, tokenizer, section="eval_sampler")
    if config.data.pad_responses_to == "auto":
        config.data.pad_responses_to = config.eval_sampler.gen_length
    if not config.train.eval_problems:
        return []
    chat = config.eval_sampler.chat
    other = [example for example in examples if example.conversational != chat]
    if other and is_rank0:
        given = "as user turns of the chat template" if chat else "as plain text"
        kind = "plain-text" if chat else "conversational (chat template)"
        option = "--no-eval-chat" if chat else "--eval-chat"
        print(
            f"warning: the held-out problems ({config.train.eval_problems}) are given {given}, but "
            f"{len(other)} of the {len(examples)} training prompts in {config.data.path} are {kind}: "
            f"eval/accuracy measures prompts the run does not train on ({option} matches them)",
            file=sys.stderr,
        )
    return [f"held-out accuracy: {config.eval_sampler.summary()}"]


def _held_out_pairs(config: Config, tokenizer, training_ids: set[str]) -> list | None:
    """The --eval-data pairs (completions for SFT), cut as the training pairs are; an id that is also
    a training pair's is refused: its held-out numbers would not be held out."""
    if not config.train.eval_data:
        return None
    examples, _ = load_preference_data(
        config.train.eval_data, skip_invalid=config.data.skip_invalid, completions=config.loss.supervised
    )
    pairs, _ = tokenize_pairs(examples, tokenizer, **config.data.tokenize_options())
    pairs = _sft_canvas(config, pairs, tokenizer)
    shared = [pair.example_id for pair in pairs if pair.example_id in training_ids]
    if shared:
        raise DsdpoError(
            f"{config.train.eval_data}: {len(shared)} held-out rows are also training rows (id {shared[0]!r} "
            f"in {config.data.path}); held-out data must be other rows"
        )
    return pairs


DRAW_ROW_BYTES = (
    8,
    600,
)  # a draw row's memory while drawn: 8 bytes a position + 600 (measured: 2.2 kB at 200)


def _check_draws_fit(config: Config, micro_batch: int) -> None:
    """A micro-batch's draws (dsdpo.objective.draws: 2 responses × P pairs × budget rows, counted as
    max_length
    positions wide) fit in half the free memory: an absurd --budget is refused here, not after minutes
    of growing memory before the first step. An estimate, per rank: rows counted at max_length (an
    upper bound), a trajectory estimator's extra rows per draw not counted."""
    import psutil

    rows = 2 * micro_batch * config.score.budget
    per_row, overhead = DRAW_ROW_BYTES
    needed, free = rows * (per_row * config.data.max_length + overhead), psutil.virtual_memory().available
    if needed > free / 2:
        raise DsdpoError(
            f"--budget {config.score.budget}: a micro-batch's draws alone take {needed / 2**30:.1f} GiB "
            f"({rows} rows of up to {config.data.max_length} positions), more than half the free memory "
            f"({free / 2**30:.1f} GiB); lower --budget"
        )


def _sft_canvas(config: Config, pairs: list, tokenizer) -> list:
    """SFT: each data set's completions padded with EOS once, before batching (dsdpo.objective.sft)."""
    if not config.loss.supervised:
        return pairs
    return pad_completions_with_eos(pairs, tokenizer.eos_token_id, config.data.max_length)


def _held_out_problems(config: Config) -> list | None:
    """The first eval_num_problems rows of --eval-problems, read before start-up."""
    if not config.train.eval_problems:
        return None
    from dsdpo.evaluation.answers import load_problems_jsonl

    return load_problems_jsonl(config.train.eval_problems, config.train.eval_num_problems)


def _check_resume_data(checkpoint: Path, data_path: str, digest: str) -> None:
    """The data file a checkpoint was trained on, edited in place since, would resume silently on
    other pairs (the same count keeps the batcher's position valid): refuse. A new data path is a
    visible change of option, warned about on resume."""
    meta = check_checkpoint(checkpoint)
    saved = meta["state"].get("data_digest")
    same_path = meta["config"].get("data", {}).get("path") == data_path
    if saved and same_path and saved != digest:
        raise DsdpoError(
            f"{data_path} changed since {checkpoint} was written (its rows' content hash differs): "
            "resuming would continue on other pairs. Restore the file, or start a fresh run"
        )


def _precomputed_reference(
    config: Config, pairs, tokenizer, dtype: str, epochs_needed: int
) -> PrecomputedReference | None:
    """The reference's precomputed terms, checked against this run's settings, precision, tokenizer
    and data."""
    if not config.model.reference_scores:
        return None
    reference = PrecomputedReference(config.model.reference_scores)
    settings = ReferenceSettings(
        estimator=config.score.estimator,
        budget=config.score.budget,
        steps=config.score.steps,
        seed=config.train.seed,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        dtype=dtype,
    )
    reference.check(settings, pairs, tokenizer, epochs_needed)
    return reference


def prepare_output(config: Config, plan: RunPlan, *, resuming: bool) -> list[str]:
    """Rank 0, before the run writes: clear an overwritten run, or on a resume set aside the
    checkpoints of an abandoned branch and cut the metrics back to the resumed step; then record the
    run's settings (train_config.yaml, ds_config.json). Notes on what was set aside or cut."""
    output, checkpoint = plan.output, plan.checkpoint
    notes = []
    if resuming:
        step = check_checkpoint(checkpoint)["state"]["step"] if checkpoint is not None else 0
        if moved := set_aside_later_checkpoints(output, step):
            notes.append(f"checkpoints after step {step} moved to {output / ABANDONED}: {', '.join(moved)}")
        # Without a checkpoint the run starts over, its step-0 evaluation included: no line is kept.
        if dropped := cut_metrics_to(output, step if checkpoint is not None else -1):
            kept = f"after step {step}" if checkpoint is not None else "of a run that saved no checkpoint"
            notes.append(
                f"{METRICS_FILE}: {dropped} lines {kept} (or cut short) removed; they are logged again"
            )
    elif config.train.overwrite:
        clear_run(output)
    (output / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (output / "ds_config.json").write_text(json.dumps(plan.ds_config, indent=2))
    return notes
