"""A run's checkpoint policy: when it saves, what a checkpoint holds beside the engine's state (the
model's files, a refreshed reference), which one --keep-best keeps, and what a resume brings back.

The checkpoint's layout and its writing are dsdpo.runtime.checkpoint's (docs/design.md, "Checkpoint
layout"); --keep-last's pruning happens there, at each save.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dsdpo.config import KEEP_BEST_METRICS, Config
from dsdpo.errors import DsdpoError
from dsdpo.models.loading import copy_code_files
from dsdpo.reference.refresh import load_reference, save_reference
from dsdpo.runtime.checkpoint import (
    TrainState,
    config_differences,
    load_checkpoint,
    save_checkpoint,
    step_tag,
    write_best,
)
from dsdpo.runtime.dist import all_reduce_max, barrier
from dsdpo.runtime.engine import Engines
from dsdpo.runtime.run_folder import BEST_FILE
from dsdpo.training.setup import RunPlan


def best_improved(config: Config, metrics: dict[str, float], state: TrainState) -> bool:
    """--keep-best: whether this evaluation's metric beats the best so far (strictly)."""
    name = config.train.keep_best
    if name not in metrics:
        raise DsdpoError(f"--keep-best {name}: this run's evaluation does not measure it")
    if state.best_value is None:
        return True
    higher_is_better = KEEP_BEST_METRICS[name]
    value = metrics[name]
    return value > state.best_value if higher_is_better else value < state.best_value


class CheckpointPolicy:
    """The checkpoints of one run: every rank calls each method at the same step."""

    def __init__(
        self, config: Config, plan: RunPlan, engines: Engines, *, is_rank0: bool, trust_checkpoint: bool
    ):
        self.config, self.plan, self.engines = config, plan, engines
        self.is_rank0, self.trust_checkpoint = is_rank0, trust_checkpoint
        self.last_saved_step = -1

    def reference_refreshed(self, step: int) -> bool:
        """Whether the reference engine has moved from its start (TR-DPO) by `step`: then a checkpoint
        holds it, and a resume loads it back."""
        every = self.config.train.ref_sync_steps
        return bool(every) and step >= every

    # --- resuming ---

    def start_state(self) -> tuple[TrainState, dict | None]:
        """The state the run starts from, and the config saved with it: a fresh one, or that of the
        checkpoint resumed from (plan.checkpoint), the batcher moved to its place in the data."""
        plan = self.plan
        if plan.checkpoint is None:
            return TrainState(data_digest=plan.data_digest), None
        state, saved_config = load_checkpoint(
            self.engines.policy,
            plan.checkpoint,
            world_size=plan.world_size,
            trust_checkpoint=self.trust_checkpoint,
        )
        plan.batcher.load_state_dict(state.batcher)
        state.data_digest = plan.data_digest  # the data this run trains on (checked in plan_run)
        self.last_saved_step = state.step
        return state, saved_config

    def restore(self, state: TrainState, saved_config: dict | None, say: Callable[[str], None]) -> None:
        """Say what changed since the checkpoint, and bring back a refreshed (TR-DPO) reference and the
        best checkpoint up to the resumed step."""
        checkpoint = self.plan.checkpoint
        for difference in config_differences(saved_config, self.config.to_dict()):
            # Stated rule: the current options win; a change of data, seed or score breaks exactness.
            say(f"warning: option differs from {checkpoint.name}, using the new value: {difference}")
        if self.reference_refreshed(state.step):
            load_reference(self.engines.reference, checkpoint, is_rank0=self.is_rank0)
        say(f"resumed from {checkpoint} at step {state.step}")
        if self.config.train.keep_best and self.is_rank0:  # --keep-best: the best up to the resumed step
            if state.best_step is not None:
                write_best(self.plan.output, step_tag(state.best_step))
            else:
                (self.plan.output / BEST_FILE).unlink(missing_ok=True)

    # --- saving ---

    def due(self, step: int) -> bool:
        """--save-every: a checkpoint of this step, unless it is the last (the final save writes it) or
        already saved."""
        every = self.config.train.save_every
        due = every and step % every == 0 and step < self.plan.total_steps
        return bool(due) and step != self.last_saved_step

    def save(self, state: TrainState, best: bool = False) -> Path:
        """A checkpoint of the current step (docs/design.md, "Checkpoint layout"); `best`: it is the
        best evaluation's (--keep-best), named by the file `best` and never pruned."""
        self.last_saved_step = state.step
        return save_checkpoint(
            self.engines.policy,
            self.plan.output,
            state,
            config=self.config.to_dict(),
            world_size=self.plan.world_size,
            is_rank0=self.is_rank0,
            save_hf_files=self._save_model_files,
            keep_last=self.config.train.keep_last,
            barrier=barrier,
            save_extra=self._save_reference_files if self.reference_refreshed(state.step) else None,
            best=best,
        )

    def save_unless_saved(self, state: TrainState) -> None:
        """The final save: never rewrite a complete checkpoint (a kill could spoil it)."""
        if state.step != self.last_saved_step:
            self.save(state)

    def keep_if_best(self, state: TrainState, metrics: dict[str, float]) -> None:
        """--keep-best: a checkpoint of this step when its evaluation beats every earlier one. Every rank
        judges the same metrics; rank 0's verdict is spread so that all save together."""
        better = best_improved(self.config, metrics, state) and self.is_rank0
        if all_reduce_max([1.0 if better else 0.0]) == [1.0]:
            state.best_step = state.step
            state.best_value = float(metrics[self.config.train.keep_best])
            self.save(state, best=True)

    def _save_model_files(self, folder: Path) -> None:
        plan = self.plan
        plan.hf_config.save_pretrained(folder)
        plan.tokenizer.save_pretrained(folder)
        copy_code_files(plan.model_folder, folder)
        if self.config.model.lora_rank:  # `dsdpo export` merges the adapters with these settings
            self.engines.policy.module.model.peft_config["default"].save_pretrained(folder)

    def _save_reference_files(self, folder: Path) -> None:
        save_reference(self.engines.reference, folder, is_rank0=self.is_rank0)
