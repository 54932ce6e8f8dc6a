"""The training loop: data -> micro-batches -> exact chunked gradient -> optimizer step -> log/save.

One optimizer step consumes train_batch_size pairs: gradient_accumulation_steps micro-batches of
train_micro_batch_size_per_gpu pairs on each rank. A micro-batch's draws are split into forward
chunks by the scorer (dsdpo.objective.gradient); the chunking never changes what a step means.
Before it: the plan (dsdpo.training.setup); beside it: when to save and what a resume brings back
(dsdpo.training.checkpoint_policy), the held-out evaluations (dsdpo.training.evaluations).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dsdpo.config import Config
from dsdpo.data import collate_pairs
from dsdpo.families import block_size_of
from dsdpo.families.routing import router_metrics, take_router_counts
from dsdpo.objective.draws import pair_draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.gradient import MicroStep, preference_micro_step
from dsdpo.objective.sft import sft_micro_step
from dsdpo.planner.chunking import resolve_chunk_sizes
from dsdpo.planner.monitor import ResourceMonitor
from dsdpo.reference.interface import Reference, as_reference
from dsdpo.reference.refresh import mix_reference
from dsdpo.runtime.checkpoint import step_tag
from dsdpo.runtime.dist import all_reduce_max, all_reduce_mean, device
from dsdpo.runtime.engine import build_engines, init_distributed
from dsdpo.runtime.faults import crash_point
from dsdpo.runtime.run_folder import run_lock
from dsdpo.runtime.zero import apply_step, drop_step, is_engine
from dsdpo.training.checkpoint_policy import CheckpointPolicy
from dsdpo.training.evaluations import RunEvaluations
from dsdpo.training.metrics import DisplacementMonitor, RunLogger, peak_memory_mb
from dsdpo.training.out_of_memory import retry_on_out_of_memory
from dsdpo.training.setup import RunPlan, plan_run, prepare_output, step_batches
from dsdpo.training.stopping import StopRequest, TooManyBadSteps, TrainingStopped

log = logging.getLogger(__name__)


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
            reference="engine" if is_engine(self.engines.reference) else "none",
            device=device(),
        ):
            plan.notes.append(note)
        self.resources = ResourceMonitor(plan.ds_config)
        self.checkpoints = CheckpointPolicy(
            config, plan, self.engines, is_rank0=self.is_rank0, trust_checkpoint=self.trust_checkpoint
        )
        if self.is_rank0:
            plan.notes += prepare_output(config, plan, resuming=self.resuming)
        self.state, saved_config = self.checkpoints.start_state()
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
            self.checkpoints.restore(self.state, saved_config, say=self.logger.message)
        else:
            self.logger.message(plan.summary)
        if self.engines.freeze_report is not None:
            self.logger.message(self.engines.freeze_report.summary())
        self.evaluations = RunEvaluations(config, plan, is_rank0=self.is_rank0)
        if self.evaluations.any and plan.checkpoint is None:  # the starting point of the curve
            self.logger.log(0, self.evaluations.run(self.policy, self.reference, 0))

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
        of device memory redoes the step's micro-batches with halved chunks (dsdpo/training/out_of_memory.py).
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

    # --- the loop ---

    def run(self) -> dict[str, float]:
        """Set up, train to the last step (or a stop request), save; the last step's metrics."""
        self.setup()
        config, plan, state, logger = self.config, self.plan, self.state, self.logger
        checkpoints, evaluations = self.checkpoints, self.evaluations
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
                evaluate = evaluations.due(state.step)
                if evaluate:
                    metrics.update(evaluations.run(self.policy, self.reference, state.step))
                if state.step % config.train.log_every == 0 or state.step == total_steps or evaluate:
                    logger.log(state.step, metrics)
                    if warning := displacement.update(state.step, metrics):
                        logger.message(warning)
                logger.advance()
                crash_point("after_step", state.step)
                if state.bad_steps_in_row >= config.train.max_bad_steps:
                    checkpoints.save(state)  # the skipped steps changed no weight: keep what was learned
                    raise TooManyBadSteps(state.bad_steps_in_row, state.step)
                if config.train.keep_best and evaluate:
                    checkpoints.keep_if_best(state, metrics)
                if checkpoints.due(state.step):
                    checkpoints.save(state)
            checkpoints.save_unless_saved(state)
            if stop.requested:
                raise TrainingStopped(plan.output / step_tag(state.step))
        finally:
            stop.restore()
            logger.close()
        return metrics
