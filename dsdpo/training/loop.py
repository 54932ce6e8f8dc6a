"""The training loop: data -> micro-batches -> exact chunked gradient -> optimizer step -> log/save.

One optimizer step consumes train_batch_size pairs: gradient_accumulation_steps micro-batches of
train_micro_batch_size_per_gpu pairs on each rank. A micro-batch's draws are split into forward
chunks by the scorer (dsdpo.objective.gradient); the chunking never changes what a step means.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsdpo.config import Config
from dsdpo.data import PairBatcher, collate_pairs, load_preference_data, tokenize_pairs
from dsdpo.data.rows import examples_digest
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.held_out import HeldOutAccuracy, HeldOutEvaluation, write_generations
from dsdpo.families import block_size_of
from dsdpo.families.routing import router_metrics, take_router_counts
from dsdpo.models.loading import (
    check_finite_weights,
    check_model_folder,
    copy_code_files,
    load_config,
    load_tokenizer,
    resolve_mask_token_id,
)
from dsdpo.models.start import StartModels
from dsdpo.objective.draws import pair_draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.gradient import MicroStep, preference_micro_step
from dsdpo.objective.scoring import ScoreSettings
from dsdpo.objective.sft import pad_completions_with_eos, sft_micro_step
from dsdpo.planner.chunking import resolve_chunk_sizes, retry_on_out_of_memory
from dsdpo.planner.monitor import ResourceMonitor
from dsdpo.planner.shapes import largest_parameter
from dsdpo.reference.interface import PrecomputedReference, Reference, as_reference
from dsdpo.reference.refresh import load_reference, mix_reference, save_reference
from dsdpo.reference.scores_file import ReferenceSettings
from dsdpo.runtime.checkpoint import (
    TrainState,
    check_checkpoint,
    config_differences,
    find_resume_checkpoint,
    is_universal,
    load_checkpoint,
    save_checkpoint,
    step_tag,
    write_best,
)
from dsdpo.runtime.dist import all_reduce_max, all_reduce_mean, barrier, device, launcher_rank_and_world
from dsdpo.runtime.ds_config import (
    fill_training_options,
    precision,
    read_ds_config,
    resolve_batch_sizes,
    resolve_ds_config,
    schedule_summary,
)
from dsdpo.runtime.engine import build_engines, init_distributed
from dsdpo.runtime.faults import crash_point
from dsdpo.runtime.run_folder import (
    ABANDONED,
    BEST_FILE,
    METRICS_FILE,
    check_fresh_output,
    check_writable,
    clear_run,
    cut_metrics_to,
    run_lock,
    set_aside_later_checkpoints,
)
from dsdpo.runtime.zero import apply_step, drop_step
from dsdpo.training.metrics import DisplacementMonitor, RunLogger, peak_memory_mb

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised after a stop request (Ctrl-C, SIGTERM) once the checkpoint of the last step is saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped; resume with --resume auto (or --resume {checkpoint})")
        self.checkpoint = checkpoint


class StoppedAtOnce(DsdpoError):
    """A second stop request: the step in progress is abandoned (a checkpoint being written stays a
    .partial folder that nothing reads)."""

    def __init__(self):
        super().__init__(
            "stopped at once by a second signal: the step in progress is lost; --resume auto "
            "continues from the last checkpoint"
        )


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary and save; a second one of either
    stops at once (a step can take minutes, and a scheduler's SIGTERM is often followed by SIGKILL)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, _signum, _frame):
        if self.requested:
            raise StoppedAtOnce
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def _prepare_output(output: Path, checkpoint: Path | None, *, resuming: bool, overwrite: bool) -> list[str]:
    """Rank 0, before the run writes: clear an overwritten run, or on a resume set aside the
    checkpoints of an abandoned branch and cut the metrics back to the resumed step."""
    if not resuming:
        if overwrite:
            clear_run(output)
        return []
    step = check_checkpoint(checkpoint)["state"]["step"] if checkpoint is not None else 0
    notes = []
    if moved := set_aside_later_checkpoints(output, step):
        notes.append(f"checkpoints after step {step} moved to {output / ABANDONED}: {', '.join(moved)}")
    # Without a checkpoint the run starts over, its step-0 evaluation included: no line is kept.
    if dropped := cut_metrics_to(output, step if checkpoint is not None else -1):
        kept = f"after step {step}" if checkpoint is not None else "of a run that saved no checkpoint"
        notes.append(f"{METRICS_FILE}: {dropped} lines {kept} (or cut short) removed; they are logged again")
    return notes


def _write_run_files(output: Path, config: Config, ds_config: dict[str, Any]) -> None:
    (output / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (output / "ds_config.json").write_text(json.dumps(ds_config, indent=2))


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


def _best_improved(config: Config, metrics: dict[str, float], state: TrainState) -> bool:
    """--keep-best: whether this evaluation's metric beats the best so far (strictly)."""
    from dsdpo.config import KEEP_BEST_METRICS

    name = config.train.keep_best
    if name not in metrics:
        raise DsdpoError(f"--keep-best {name}: this run's evaluation does not measure it")
    if state.best_value is None:
        return True
    higher_is_better = KEEP_BEST_METRICS[name]
    value = metrics[name]
    return value > state.best_value if higher_is_better else value < state.best_value


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


def train(
    config: Config,
    ds_config_path: str | Path,
    *,
    nvme_path: str | None = None,
    resume: str | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, float]:
    """Run (or resume) training; return the last step's metrics. `trust_checkpoint` lets the
    checkpoint resumed from (or started from, as --model or --ref-model) hold pickled code
    (dsdpo.runtime.safe_load)."""
    plan = plan_run(
        config, ds_config_path, nvme_path=nvme_path, resume=resume, trust_checkpoint=trust_checkpoint
    )
    with run_lock(plan.output, enabled=plan.rank == 0) as note:
        if note:
            plan.notes.append(note)
        return Trainer(config, plan, resuming=resume is not None, trust_checkpoint=trust_checkpoint).run()


class Trainer:
    """One training run, read top to bottom: setup, then step after step (log, evaluate, save),
    then the last save. The plan (plan_run) is checked before any of it starts."""

    def __init__(self, config: Config, plan: RunPlan, *, resuming: bool, trust_checkpoint: bool = False):
        self.config, self.plan = config, plan
        self.resuming, self.trust_checkpoint = resuming, trust_checkpoint
        self.is_rank0 = plan.rank == 0
        self.state = TrainState(data_digest=plan.data_digest)
        self.last_saved_step = -1

    # --- setup: engines, the reference, the output folder, the checkpoint resumed from, the log ---

    def setup(self) -> None:
        config, plan = self.config, self.plan
        init_distributed()
        with_reference = plan.reference_scores is None and not (
            config.loss.reference_free or config.loss.supervised
        )
        with plan.start_models as model_config:  # a checkpoint's export lives while the engines load it
            self.engines = build_engines(
                model_config, plan.ds_config, with_reference=with_reference, seed=config.train.seed
            )
        self.policy = self.engines.policy
        # A block model's forward row is [noised ; clean]: twice its sequence (dsdpo.objective.blocks).
        self.row_copies = 1 if block_size_of(plan.hf_config) is None else 2
        # The one place that says which of the four references this run has (docs/design.md,
        # "Reference model: four ways"); the steps only ask it for terms.
        self.reference: Reference = plan.reference_scores or as_reference(self.engines.reference)
        if note := resolve_chunk_sizes(  # --max-tokens-per-forward auto (default on CUDA), dsdpo/planner
            config.score,
            model=config.model.path,
            ds_config=plan.ds_config,
            max_length=config.data.max_length,
            budget=config.score.budget,
            micro_batch=plan.batch_sizes["train_micro_batch_size_per_gpu"],
            gradient_checkpointing=config.model.gradient_checkpointing,
            reference="engine" if hasattr(self.engines.reference, "empty_partition_cache") else "none",
            device=device(),
        ):
            plan.notes.append(note)
        self.resources = ResourceMonitor(plan.ds_config)
        if self.is_rank0:
            plan.notes += _prepare_output(
                plan.output, plan.checkpoint, resuming=self.resuming, overwrite=config.train.overwrite
            )
            _write_run_files(plan.output, config, plan.ds_config)
        saved_config = self._load_checkpoint()
        self.logger = RunLogger(
            plan.output,
            total_steps=plan.total_steps,
            initial_step=self.state.step,
            enabled=self.is_rank0,
            report_to=config.train.trackers,
            config=config.to_dict(),
        )
        for note in plan.notes:
            self.logger.message(f"note: {note}")
        if plan.checkpoint is not None:
            self._resume_reference(saved_config)
        else:
            self.logger.message(plan.summary)
        if self.engines.freeze_report is not None:
            self.logger.message(self.engines.freeze_report.summary())
        self.evaluation = self._held_out_evaluation()
        self.accuracy_evaluation = self._held_out_accuracy()
        evaluated = self.evaluation is not None or self.accuracy_evaluation is not None
        if evaluated and plan.checkpoint is None:  # the starting point of the curve
            self.logger.log(0, self.run_evaluations(0))

    def _load_checkpoint(self) -> dict | None:
        """The state (and saved config) of the checkpoint resumed from, if any."""
        checkpoint = self.plan.checkpoint
        if checkpoint is None:
            return None
        self.state, saved_config = load_checkpoint(
            self.policy, checkpoint, world_size=self.plan.world_size, trust_checkpoint=self.trust_checkpoint
        )
        self.plan.batcher.load_state_dict(self.state.batcher)
        self.state.data_digest = self.plan.data_digest  # the data this run trains on (checked in plan_run)
        self.last_saved_step = self.state.step
        return saved_config

    def _resume_reference(self, saved_config: dict | None) -> None:
        """Say what changed since the checkpoint, and bring back a refreshed (TR-DPO) reference."""
        checkpoint = self.plan.checkpoint
        for difference in config_differences(saved_config, self.config.to_dict()):
            # Stated rule: the current options win; a change of data, seed or score breaks exactness.
            self.logger.message(
                f"warning: option differs from {checkpoint.name}, using the new value: {difference}"
            )
        if self._reference_refreshed(self.state.step):
            load_reference(self.engines.reference, checkpoint, is_rank0=self.is_rank0)
        self.logger.message(f"resumed from {checkpoint} at step {self.state.step}")
        if self.config.train.keep_best and self.is_rank0:  # --keep-best: the best up to the resumed step
            if self.state.best_step is not None:
                write_best(self.plan.output, step_tag(self.state.best_step))
            else:
                (self.plan.output / BEST_FILE).unlink(missing_ok=True)

    def _held_out_evaluation(self) -> HeldOutEvaluation | None:
        config, plan = self.config, self.plan
        if plan.eval_pairs is None:
            return None
        return HeldOutEvaluation(
            plan.eval_pairs,
            loss=config.loss,
            settings=ScoreSettings(
                budget=config.score.budget,
                estimator=config.score.estimator,
                steps=config.score.steps,
                seed=config.train.seed,
            ),
            max_tokens_no_grad=config.score.no_grad_tokens,
            mask_token_id=plan.mask_token_id,
            pad_token_id=plan.tokenizer.pad_token_id or 0,
            block_size=block_size_of(plan.hf_config),
        )

    def _held_out_accuracy(self) -> HeldOutAccuracy | None:
        """--eval-problems: generation accuracy at every evaluation; None without it."""
        config, plan = self.config, self.plan
        if plan.eval_problems is None:
            return None
        return HeldOutAccuracy(
            plan.eval_problems,
            tokenizer=plan.tokenizer,
            mask_token_id=plan.mask_token_id,
            sampler=config.eval_sampler.generate_kwargs(),  # resolved for the model by plan_run
            samples=config.train.eval_samples,
            seed=config.train.seed,
            chat=config.eval_sampler.chat,
        )

    def run_evaluations(self, step: int) -> dict[str, float]:
        """The held-out metrics of this step: preference scores and/or generation accuracy."""
        results = self.evaluation.run(self.policy, self.reference) if self.evaluation else {}
        if self.accuracy_evaluation is not None:
            accuracy, records = self.accuracy_evaluation.run(self.policy)
            results.update(accuracy)
            if self.is_rank0:
                write_generations(self.plan.output, step_tag(step), records)
        return results

    def _reference_refreshed(self, step: int) -> bool:
        """Whether the reference engine has moved from its start (TR-DPO) by `step`."""
        every = self.config.train.ref_sync_steps
        return bool(every) and step >= every

    # --- one optimizer step: every micro-batch's exact gradient, then the update ---

    def micro_step(self, pairs: list, epoch: int) -> tuple[MicroStep, int]:
        """Forward and backward of one micro-batch (no update); and the tokens it holds."""
        config, plan = self.config, self.plan
        score, supervised = config.score, config.loss.supervised
        batch = collate_pairs(pairs, pad_token_id=plan.tokenizer.pad_token_id or 0, chosen_only=supervised)
        scoring = ScoringBatch.build(
            batch.input_ids.to(device()), batch.response_mask.to(device()), batch.attention_mask.to(device())
        )

        def draws_for(role: str = "", chosen_only: bool = False):
            return pair_draws(
                batch.example_ids, scoring.response_lengths, score.budget, score.estimator,
                seed=config.train.seed, epoch=epoch, steps=score.steps, chosen_only=chosen_only, role=role,
                block_size=block_size_of(plan.hf_config), response_starts=scoring.response_starts,
            )  # fmt: skip

        draws = draws_for(chosen_only=supervised)
        tokens = int(batch.attention_mask.sum())
        loss_scale = 1.0 / plan.batch_sizes["gradient_accumulation_steps"]
        if supervised:
            result = sft_micro_step(
                self.policy, scoring, draws, mask_token_id=plan.mask_token_id,
                max_tokens_per_forward=score.max_tokens_per_forward, loss_scale=loss_scale,
                per_response=config.loss.sft_per_response,
            )  # fmt: skip
            return result, tokens
        result = preference_micro_step(
            self.policy,
            self.reference,
            scoring,
            draws,
            mask_token_id=plan.mask_token_id,
            loss_config=config.loss,
            max_tokens_per_forward=score.max_tokens_per_forward,
            max_tokens_no_grad=score.no_grad_tokens,
            loss_scale=loss_scale,
            preference_prob=batch.preference_prob.to(device()) if batch.preference_prob is not None else None,
            reference_draws=None if score.antithetic else draws_for(role="reference"),
            example_ids=batch.example_ids,
            epoch=epoch,
        )
        return result, tokens

    def step(self, epoch: int, micro_batches: list[list]) -> dict[str, float]:
        """All micro-batches of one step, then the optimizer update (or nothing, if any loss or the
        gradient was not finite); the step's metrics, averaged over micro-batches and ranks. A chunk out
        of device memory redoes the step's micro-batches with halved chunks (dsdpo/planner/chunking.py).
        A mixture-of-experts policy adds its router statistics (dsdpo/families/routing.py)."""
        policy = self.policy
        take_router_counts(policy.module)  # forget the forwards outside training steps (evaluation)

        def accumulate() -> tuple[list[MicroStep], int]:
            results, tokens = [], 0
            for pairs in micro_batches:
                result, count = self.micro_step(pairs, epoch)
                results.append(result)
                tokens += count
            return results, tokens

        (results, tokens), retries = retry_on_out_of_memory(
            accumulate,
            self.config.score,
            widest_row=max(pair.length for pairs in micro_batches for pair in pairs) * self.row_copies,
            engines=(policy, self.engines.reference),
            say=log.warning,
        )
        finite = all(result.finite for result in results)
        lr = float(policy.get_lr()[0])  # the rate this step applies (step() moves the schedule on)
        if finite:
            finite = apply_step(policy)
        else:
            drop_step(policy)
        names = results[0].metrics.keys()
        averaged = {name: sum(r.metrics[name] for r in results) / len(results) for name in names}
        averaged["sweeps"] = float(sum(r.sweeps for r in results))
        averaged["tokens"] = float(tokens)
        if (counts := take_router_counts(policy.module)) is not None:
            averaged.update(router_metrics(counts))
        merged = all_reduce_mean(averaged)
        merged["finite"] = 1.0 if finite else 0.0
        merged["lr"] = lr
        if retries:
            merged["oom_retries"] = float(retries)
        if finite:
            merged["grad_norm"] = float(policy.get_global_grad_norm())
        return merged

    def _after_step(self, epoch: int, metrics: dict[str, float], started: float) -> dict[str, float]:
        """Count the step, refresh the reference (TR-DPO), and add the run's counters to the metrics."""
        config, plan, state = self.config, self.plan, self.state
        state.step += 1
        state.consumed_pairs += plan.batch_sizes["train_batch_size"]
        if config.train.ref_sync_steps and state.step % config.train.ref_sync_steps == 0:
            mix_reference(
                self.policy, self.engines.reference, config.train.ref_sync_alpha, is_rank0=self.is_rank0
            )
        if metrics.pop("finite") == 1.0:
            state.bad_steps_in_row = 0
        else:
            state.skipped_steps += 1
            state.bad_steps_in_row += 1
        state.batcher = plan.batcher.state_dict()
        elapsed = time.perf_counter() - started
        metrics.update(
            epoch=epoch,
            consumed_pairs=state.consumed_pairs,
            skipped_steps=state.skipped_steps,
            seconds=elapsed,
            pairs_per_s=plan.batch_sizes["train_batch_size"] / elapsed,
            tokens_per_s=metrics.pop("tokens") * plan.world_size / elapsed,
            peak_memory_mb=peak_memory_mb(),
            **self.resources.sample(),
        )
        return metrics

    def _evaluation_due(self, step: int) -> bool:
        every = self.config.train.eval_every
        evaluated = self.evaluation is not None or self.accuracy_evaluation is not None
        return evaluated and (step == self.plan.total_steps or (bool(every) and step % every == 0))

    # --- saving ---

    def save(self, best: bool = False) -> Path:
        """A checkpoint of the current step (docs/design.md, "Checkpoint layout"); `best`: it is the
        best evaluation's (--keep-best), named by the file `best` and never pruned."""
        state = self.state
        self.last_saved_step = state.step
        return save_checkpoint(
            self.policy,
            self.plan.output,
            state,
            config=self.config.to_dict(),
            world_size=self.plan.world_size,
            is_rank0=self.is_rank0,
            save_hf_files=self._save_model_files,
            keep_last=self.config.train.keep_last,
            barrier=barrier,
            save_extra=self._save_reference_files if self._reference_refreshed(state.step) else None,
            best=best,
        )

    def _save_model_files(self, folder: Path) -> None:
        self.plan.hf_config.save_pretrained(folder)
        self.plan.tokenizer.save_pretrained(folder)
        copy_code_files(self.plan.model_folder, folder)
        if self.config.model.lora_rank:  # `dsdpo export` merges the adapters with these settings
            self.policy.module.model.peft_config["default"].save_pretrained(folder)

    def _save_reference_files(self, folder: Path) -> None:
        save_reference(self.engines.reference, folder, is_rank0=self.is_rank0)

    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        """--keep-best: a checkpoint of this step when its evaluation beats every earlier one. Every rank
        judges the same metrics; rank 0's verdict is spread so that all save together."""
        better = _best_improved(self.config, metrics, self.state) and self.is_rank0
        if all_reduce_max([1.0 if better else 0.0]) == [1.0]:
            self.state.best_step = self.state.step
            self.state.best_value = float(metrics[self.config.train.keep_best])
            self.save(best=True)

    # --- the loop ---

    def run(self) -> dict[str, float]:
        """Set up, train to the last step (or a stop request), save; the last step's metrics."""
        self.setup()
        config, plan, state, logger = self.config, self.plan, self.state, self.logger
        total_steps = plan.total_steps
        stop = StopRequest()
        displacement = DisplacementMonitor()
        steps = step_batches(plan.batcher, plan.batch_sizes["train_micro_batch_size_per_gpu"])
        metrics: dict[str, float] = {}
        try:
            while state.step < total_steps:
                if all_reduce_max([1.0 if stop.requested else 0.0]) == [1.0]:
                    logger.message(f"stopping at step {state.step}: saving a checkpoint")
                    break
                started = time.perf_counter()
                epoch, micro_batches = next(steps)
                metrics = self._after_step(epoch, self.step(epoch, micro_batches), started)
                evaluate = self._evaluation_due(state.step)
                if evaluate:
                    metrics.update(self.run_evaluations(state.step))
                if state.step % config.train.log_every == 0 or state.step == total_steps or evaluate:
                    logger.log(state.step, metrics)
                    if warning := displacement.update(state.step, metrics):
                        logger.message(warning)
                logger.advance()
                crash_point("after_step", state.step)
                if state.bad_steps_in_row >= config.train.max_bad_steps:
                    self.save()  # the skipped steps changed no weight: keep what the run had learned
                    raise DsdpoError(
                        f"{state.bad_steps_in_row} steps in a row had a non-finite loss or gradient "
                        f"(step {state.step}); "
                        "the weights were not updated by them. Lower the learning rate, or check the data"
                    )
                if config.train.keep_best and evaluate:
                    self._keep_if_best(metrics)
                every = config.train.save_every
                due = every and state.step % every == 0 and state.step < total_steps
                if due and state.step != self.last_saved_step:
                    self.save()
            if (
                state.step != self.last_saved_step
            ):  # never rewrite a complete checkpoint (a kill could spoil it)
                self.save()
            if stop.requested:
                raise TrainingStopped(plan.output / step_tag(state.step))
        finally:
            stop.restore()
            logger.close()
        return metrics


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
