"""The train section (TrainConfig): run length, checkpoints, held-out evaluation, optimizer and
schedule options, trackers."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config.options import AUTO_DEFAULTS, LORA_AUTO_DEFAULTS, LR_SCHEDULERS
from dsdpo.settings import setting
from dsdpo.training.trackers import TRACKERS, check_installed

# --keep-best METRIC: whether a higher value of the metric is better
KEEP_BEST_METRICS = {
    "eval/loss": False,
    "eval/accuracy": True,
    "eval/rewards/accuracies": True,
    "eval/rewards/margins": True,
}


@dataclass
class TrainConfig:
    output: str = setting(
        "runs/dsdpo", "folder for metrics, configs, TensorBoard and checkpoints", flag="--output"
    )
    overwrite: bool = setting(
        False, "start afresh in an --output folder that holds a run: its checkpoints and metrics are removed"
    )
    epochs: int = setting(1, "passes over the data")
    max_steps: int | None = setting(
        None,
        "optimizer steps of the run, and of the learning-rate schedule; overrides --epochs, as Hugging "
        "Face's Trainer (default: all epochs)",
    )
    seed: int = setting(0, "data order and Monte Carlo draws")
    log_every: int = setting(1, "optimizer steps between metrics lines")
    save_every: int | None = setting(None, "optimizer steps between checkpoints (always at the end)")
    keep_last: int = setting(2, "checkpoints to keep")
    max_bad_steps: int = setting(3, "consecutive non-finite steps before stopping")
    # TR-DPO (dsdpo.reference.refresh): every ref_sync_steps steps θ_ref ← α·θ + (1 − α)·θ_ref
    ref_sync_steps: int = setting(
        0, "TR-DPO: every this many steps move the reference engine towards the policy (0: never)"
    )
    ref_sync_alpha: float = setting(
        0.6,
        "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (TRL's ref_model_mixup_alpha; 1 is a hard update)",
    )
    eval_data: str | None = setting(
        None,
        "held-out pairs (completions with --loss sft), scored with the same draws at every evaluation; "
        "eval/* metrics in metrics.jsonl and TensorBoard",
    )
    eval_every: int = setting(0, "steps between evaluations (0: before the first step and at the end)")
    # --- generation accuracy at each evaluation (held_out.HeldOutAccuracy), the best checkpoint ---
    eval_problems: str | None = setting(
        None,
        "held-out problems (question/answer JSONL, as `dsdpo eval accuracy --data`): at every evaluation "
        "the policy answers them with LLaDA's sampler (the --eval-gen-length ... --eval-chat options), "
        "seeded with --seed; eval/accuracy and its 95% Wilson bounds, the answers in "
        "eval_generations/step_N.jsonl",
    )
    eval_num_problems: int | None = setting(
        64, "the first N problems of --eval-problems (--set train.eval_num_problems=null: all)"
    )
    eval_samples: int = setting(1, "answers per held-out problem (> 1 needs --eval-temperature)")
    keep_best: str | None = setting(
        None,
        "keep the checkpoint of the best evaluation after step 0 by this metric (eval/loss: lower is "
        "better; eval/accuracy, eval/rewards/accuracies, eval/rewards/margins: higher), named by the file "
        "`best` in --output and never pruned by --keep-last",
        choices=KEEP_BEST_METRICS,
    )
    # --- optimizer, schedule and batch: HF's TrainingArguments names. Each fills the DeepSpeed JSON's
    # "auto" for its key (dsdpo.runtime.ds_config.fill_training_options); None leaves the JSON's number, or
    # AUTO_DEFAULTS where it says "auto". Given here and as a number in the JSON is an error. ---
    learning_rate: float | None = setting(
        None,
        f"peak learning rate (default {AUTO_DEFAULTS['learning_rate']}, with --lora-rank "
        f"{LORA_AUTO_DEFAULTS['learning_rate']}, where the JSON says auto)",
    )
    lr_scheduler: str | None = setting(
        None,
        "schedule after the warmup: constant, linear (decay to 0) or cosine (to 0), DeepSpeed's WarmupLR, "
        f"WarmupDecayLR or WarmupCosineLR (default {AUTO_DEFAULTS['lr_scheduler']} where the JSON's "
        "scheduler.type says auto); the warmup's start and curve are the JSON's (\"warmup_min_ratio\", "
        '"warmup_type")',
        choices=LR_SCHEDULERS,
    )
    warmup_steps: int | None = setting(
        None,
        f"optimizer steps of warmup (default {AUTO_DEFAULTS['warmup_steps']} where the JSON says auto; "
        "DeepSpeed warms up over at least 2)",
    )
    warmup_ratio: float | None = setting(
        None, "warmup as a fraction of the run's steps: ceil(ratio x steps), as Hugging Face's Trainer"
    )
    weight_decay: float | None = setting(
        None,
        f"AdamW's weight decay (default {AUTO_DEFAULTS['weight_decay']}, with --lora-rank "
        f"{LORA_AUTO_DEFAULTS['weight_decay']}, where the JSON says auto)",
    )
    per_device_batch_size: int | None = setting(
        None,
        "pairs per micro-batch on each GPU, train_micro_batch_size_per_gpu "
        f"(default {AUTO_DEFAULTS['per_device_batch_size']} where the JSON says auto)",
    )
    gradient_accumulation_steps: int | None = setting(
        None,
        "micro-batches per optimizer step "
        f"(default {AUTO_DEFAULTS['gradient_accumulation_steps']} where the JSON says auto)",
    )
    report_to: str | None = setting(
        None,
        f"where metrics go besides metrics.jsonl, comma-separated: {', '.join(TRACKERS)}, or none; each "
        "an optional extra (pip install 'dsdpo[wandb]'). Offline: WANDB_MODE=offline, MLflow's database "
        "--output/mlflow.db unless MLFLOW_TRACKING_URI is set, trackio's local store (default: tensorboard "
        "where it is installed)",
    )

    def validate(self):
        for name in ("epochs", "log_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise DsdpoError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        optional_counts = (
            "max_steps", "save_every", "eval_num_problems", "eval_samples", "per_device_batch_size",
            "gradient_accumulation_steps",
        )  # fmt: skip
        for name in optional_counts:  # None: not given
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DsdpoError(f"train.{name} must be at least 1, got {value}")
        if self.ref_sync_steps < 0:
            raise DsdpoError(f"train.ref_sync_steps must be 0 (off) or positive, got {self.ref_sync_steps}")
        if self.eval_every < 0:
            raise DsdpoError(
                f"train.eval_every must be 0 (start and end only) or positive, got {self.eval_every}"
            )
        if self.eval_every and not (self.eval_data or self.eval_problems):
            raise DsdpoError(
                "train.eval_every needs held-out data: give --eval-data FILE or --eval-problems FILE"
            )
        self._validate_keep_best()
        self._validate_optimizer()
        self._validate_report_to()
        if not 0 < self.ref_sync_alpha <= 1:
            raise DsdpoError(f"train.ref_sync_alpha must be in (0, 1], got {self.ref_sync_alpha}")

    def _validate_optimizer(self):
        for name in ("learning_rate", "weight_decay", "warmup_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:  # NaN fails the comparison too
                raise DsdpoError(f"train.{name} must be a finite number >= 0, got {value}")
        if self.warmup_ratio is not None and self.warmup_ratio > 1:
            raise DsdpoError(f"train.warmup_ratio: a fraction of the run, in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise DsdpoError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise DsdpoError("train.warmup_steps and train.warmup_ratio: give one of the two")
        if self.lr_scheduler is not None and self.lr_scheduler not in LR_SCHEDULERS:
            raise DsdpoError(
                f"train.lr_scheduler: unknown {self.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}"
            )

    def _validate_report_to(self):
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise DsdpoError(
                f"train.report_to: unknown {', '.join(unknown)}; choose from {', '.join(TRACKERS)} or none"
            )
        check_installed(self.trackers)

    @property
    def trackers(self) -> list[str]:
        """--report-to as a list of backend names ("none": only metrics.jsonl)."""
        if self.report_to is None:
            return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
        names = [name.strip().lower() for name in self.report_to.split(",") if name.strip()]
        return [] if names == ["none"] else names

    def _validate_keep_best(self):
        if self.keep_best is None:
            return
        if self.keep_best not in KEEP_BEST_METRICS:
            raise DsdpoError(
                f"train.keep_best: unknown metric {self.keep_best!r}; "
                f"choose one of {', '.join(KEEP_BEST_METRICS)}"
            )
        needs = "eval_problems" if self.keep_best == "eval/accuracy" else "eval_data"
        if not getattr(self, needs):
            option = "--eval-problems" if needs == "eval_problems" else "--eval-data"
            raise DsdpoError(f"train.keep_best {self.keep_best} is measured on {option} FILE: give it")
