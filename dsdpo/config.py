"""Typed training configuration: dataclasses that validate themselves and name the bad field.

A config comes from a YAML/JSON file with one section per dataclass (model, data, score, loss,
train, eval_sampler), then command-line overrides. DeepSpeed settings (ZeRO, offload, precision) are
not here: they live in the DeepSpeed JSON (see dsdpo/runtime/ds_config.py). The batch, optimizer and schedule
options (train.learning_rate, ...) fill that JSON's "auto" values, as Hugging Face's Trainer does.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsdpo.errors import DsdpoError
from dsdpo.objective.loss_config import LossConfig
from dsdpo.runtime.ds_config import AUTO_DEFAULTS, LORA_AUTO_DEFAULTS, LR_SCHEDULERS
from dsdpo.training.trackers import TRACKERS, check_installed

# The choices the settings offer, importable without torch (the command line is built from them):
ESTIMATORS = ("l_over_L", "one_over_t", "trajectory")  # the ELBO estimators of dsdpo.objective.draws
REMASKING = ("low_confidence", "random")  # which proposals LLaDA's sampler keeps (dsdpo.evaluation.sampler)


def setting(default: Any = None, help: str = "", *, flag: str | None = None, choices=None, **kwargs):
    """A config field with its command-line help beside it (dsdpo.cli.train builds the options):
    `flag` when it is not --field-name (--no-field-name for a bool that defaults to True), `choices`
    read from the code that implements them. The one place a setting's default is written."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    if "default_factory" in kwargs:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    path: str = setting(
        "", "the model to train: a local Hugging Face folder or a dsdpo checkpoint", flag="--model"
    )
    reference_path: str | None = setting(
        None, "reference model folder or checkpoint (default: the starting policy)", flag="--ref-model"
    )
    reference_scores: str | None = setting(
        None, "reference terms from `dsdpo precompute-reference`: no reference model in memory"
    )
    trust_remote_code: bool = setting(False, "allow the model's own code (LLaDA)")
    mask_token_id: int | None = setting(None, "mask token id (default: from config or tokenizer)")
    gradient_checkpointing: bool = setting(
        True,
        "keep activations instead of recomputing them (faster, more memory)",
    )
    lora_rank: int | None = setting(
        None,
        "train LoRA adapters of this rank instead of every weight; the reference is then the same model "
        "with the adapters off",
    )
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    lora_target_modules: str = setting(
        "auto",
        'comma-separated module names, "all-linear", or "auto" (every linear layer of the blocks for '
        "LLaDA and Dream, the same but the routed experts and router for LLaDA-MoE, all-linear for "
        "other models)",
    )
    freeze: str = setting(
        "",
        'parameters that do not train, comma-separated: "embeddings", "head", "layers:K" (the first K '
        "blocks) or name regexes; they get no optimizer state (the saving is printed at start)",
    )

    def validate(self):
        if not self.path:
            raise DsdpoError("model.path is required: a local model folder (--model DIR)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise DsdpoError(f"model.lora_rank must be at least 1, got {self.lora_rank}")
        if self.freeze and self.lora_rank:
            raise DsdpoError("model.freeze: with LoRA only the adapters train already; drop one of the two")
        if self.reference_path and self.reference_scores:
            raise DsdpoError(
                "model.reference_path and model.reference_scores exclude each other: the scores file "
                "already holds the reference"
            )


@dataclass
class DataConfig:
    path: str = setting(
        "", "preference pairs (prompt/chosen/rejected): JSONL, JSON, Parquet, datasets folder", flag="--data"
    )
    max_length: int = setting(1024, "prompt + response tokens")
    max_prompt_length: int | None = setting(None, "prompt tokens kept (its end)")
    skip_invalid: bool = setting(False, "skip bad rows (counted by reason) instead of stopping")
    refuse_long_prompts: bool = setting(
        False,
        "a prompt that fills --max-length is an error (skipped with --skip-invalid); default: its start "
        "is cut so the response fits, and counted",
    )
    pad_responses_to: int | str | None = setting(
        None,
        "fill every response with EOS to this many tokens, the sampler's gen length: answers are then "
        'scored on the canvas generation fills; "auto": the held-out sampler\'s gen length '
        "(--eval-gen-length, or the model family's) (default: the answer and one EOS)",
    )

    def tokenize_options(self) -> dict:
        """How dsdpo.data.tokenize_pairs cuts and pads this data (training and held-out alike)."""
        return dict(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            skip_invalid=self.skip_invalid,
            refuse_long_prompts=self.refuse_long_prompts,
            pad_responses_to=self.pad_responses_to,
        )

    def validate(self):
        if not self.path:
            raise DsdpoError("data.path is required: a preference data file (--data FILE)")
        if self.max_length < 2:
            raise DsdpoError(f"data.max_length must be at least 2, got {self.max_length}")
        pad = self.pad_responses_to
        if (isinstance(pad, str) and pad != "auto") or (isinstance(pad, int) and pad < 1):
            raise DsdpoError(f'data.pad_responses_to: a positive number or "auto", got {pad!r}')


DEFAULT_TOKENS = 4096  # --max-tokens-per-forward unset, off CUDA (dsdpo/planner/chunking.py)


@dataclass
class ScoreConfig:
    estimator: str = setting("l_over_L", "ELBO estimator (dsdpo/objective/draws.py)", choices=ESTIMATORS)
    budget: int = setting(8, "Monte Carlo draws per response (VRPO's n)")
    steps: int | None = setting(
        None, "unmasking steps T of the trajectory estimator (default L)", flag="--trajectory-steps"
    )
    # "auto": the largest chunks the planner fits in the free device memory (dsdpo/planner/chunking.py).
    # Resolved to a number when training starts.
    max_tokens_per_forward: int | str | None = setting(
        None,
        'rows x tokens per forward with gradients: the activation-memory knob, or "auto": the largest '
        "chunks the planner fits in the free device memory (default: auto on CUDA, 4096 elsewhere)",
    )
    # No activations are kept for backward without gradients, so this can be several times larger.
    max_tokens_no_grad: int | None = setting(
        None, "rows x tokens per forward without gradients (default 4 x --max-tokens-per-forward)"
    )
    # VRPO's antithetic sampling: the shared noise cancels in B̂_θ − B̂_ref.
    antithetic: bool = setting(
        True,
        "give the reference its own draws instead of the policy's (an ablation of VRPO)",
    )

    def validate(self):
        if self.estimator not in ESTIMATORS:
            raise DsdpoError(
                f"score.estimator: unknown {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}"
            )
        if self.budget < 1:
            raise DsdpoError(f"score.budget must be at least 1, got {self.budget}")
        tokens = self.max_tokens_per_forward
        if isinstance(tokens, str) and tokens != "auto":
            raise DsdpoError(f'score.max_tokens_per_forward: a positive number or "auto", got {tokens!r}')
        for name in ("max_tokens_per_forward", "max_tokens_no_grad"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise DsdpoError(f"score.{name} must be positive, got {value}")

    @property
    def no_grad_tokens(self) -> int:
        if self.max_tokens_no_grad is None:
            return 4 * self.max_tokens_per_forward
        return self.max_tokens_no_grad


def check_schedule(gen_length: int, block_length: int, steps: int) -> int:
    """Validate the sampler's block/step plan; return the number of steps per block."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise DsdpoError(
            f"gen_length ({gen_length}), block_length ({block_length}) and steps ({steps}) must be positive"
        )
    if gen_length % block_length:
        raise DsdpoError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise DsdpoError(f"steps {steps} must be a multiple of the number of blocks ({num_blocks})")
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
        raise DsdpoError(
            f"{steps_per_block} steps per block exceed block_length {block_length}: "
            f"a step would reveal nothing; use at most {gen_length} steps"
        )
    return steps_per_block


# The sampler's schedule for a model whose family has no published one (dsdpo.families.Family).
DEFAULT_GEN_LENGTH, DEFAULT_BLOCK_LENGTH = 128, 32


@dataclass
class SamplerConfig:
    """LLaDA's sampler (dsdpo.evaluation.sampler), set the same way by every command that generates: `dsdpo
    generate`, `dsdpo eval accuracy`, `dsdpo make-pairs` (--gen-length ... --chat/--no-chat) and
    training's held-out accuracy (the section eval_sampler: --eval-gen-length ... --eval-chat). A
    field left None is filled from the model when it is loaded (`resolved`)."""

    gen_length: int | None = setting(
        None,
        "answer tokens; the answer starts fully masked, text after EOS is dropped (default: the model "
        f"family's published setting, dsdpo/families, else {DEFAULT_GEN_LENGTH})",
    )
    block_length: int | None = setting(
        None,
        "blocks are decoded left to right (semi-autoregressive); the gen length must be a multiple. "
        f"Default: the model family's published setting, else {DEFAULT_BLOCK_LENGTH} (at most the gen "
        "length). A block-diffusion model (SDAR) always uses its own",
    )
    steps: int | None = setting(
        None,
        "denoising steps (model forwards) in all, split evenly over the blocks; fewer reveal more "
        "tokens each: faster, usually worse. At most, and by default, the gen length",
    )
    temperature: float = setting(0.0, "sampling temperature of each proposed token (Gumbel-max); 0: greedy")
    remasking: str = setting(
        "low_confidence",
        "which proposals each step keeps: the most confident ones, or random ones",
        choices=REMASKING,
    )
    cfg_scale: float = setting(
        0.0, "classifier-free guidance: > 0 pushes away from a pass with the prompt masked (a second forward)"
    )
    chat: bool | None = setting(
        None,
        "give each prompt as a user turn of the tokenizer's chat template, or plain (default: the chat "
        "template when the tokenizer has one, said when used)",
    )

    def validate(self, section: str = "sampler") -> SamplerConfig:
        if self.temperature < 0:
            raise DsdpoError(f"{section}.temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise DsdpoError(f"{section}.cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise DsdpoError(
                f"{section}.remasking: unknown {self.remasking!r}; choose one of {', '.join(REMASKING)}"
            )
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DsdpoError(f"{section}.{name} must be at least 1, got {value}")
        if None not in (self.gen_length, self.block_length, self.steps):
            try:
                check_schedule(self.gen_length, self.block_length, self.steps)
            except DsdpoError as err:
                raise DsdpoError(f"{section}.gen_length/block_length/steps: {err}") from None
        return self

    def resolved(
        self,
        *,
        gen_length: int | None,
        block_length: int | None,
        chat_template: bool,
        section: str = "sampler",
    ) -> SamplerConfig:
        """Every field set: where this leaves them unset, the schedule from the model family's
        published `gen_length` and `block_length` (None: dsdpo's defaults), the block at most the gen
        length, and steps = gen length (one token a step); chat when the tokenizer has a chat template,
        unless set (a template the tokenizer lacks cannot be used)."""
        gen = self.gen_length or gen_length or DEFAULT_GEN_LENGTH
        block = self.block_length or min(gen, block_length or DEFAULT_BLOCK_LENGTH)
        chat = chat_template if self.chat is None else self.chat and chat_template
        steps = self.steps or gen
        resolved = dataclasses.replace(self, gen_length=gen, block_length=block, steps=steps, chat=chat)
        return resolved.validate(section)

    def summary(self) -> str:
        """One line saying how a (resolved) sampler generates, and how it gives the prompts."""
        chat = (
            "prompts as user turns of the chat template" if self.chat else "plain prompts (no chat template)"
        )
        return (
            f"sampler: gen length {self.gen_length}, block length {self.block_length}, steps {self.steps}, "
            f"temperature {self.temperature}, remasking {self.remasking}, cfg scale {self.cfg_scale}; {chat}"
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of dsdpo.evaluation.sampler.generate (a resolved config)."""
        names = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale")
        return {name: getattr(self, name) for name in names}


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_sampler: SamplerConfig = field(default_factory=SamplerConfig)  # --eval-problems' sampler

    def validate(self) -> Config:
        for section in (self.model, self.data, self.score, self.train):
            section.validate()
        self.eval_sampler.validate("eval_sampler")
        if self.train.eval_samples > 1 and self.eval_sampler.temperature == 0:
            raise DsdpoError(
                f"train.eval_samples {self.train.eval_samples} with eval_sampler.temperature 0 gives copies "
                "of one answer: set --eval-temperature > 0"
            )
        if not self.score.antithetic and (self.model.reference_scores or self.loss.objective == "per_draw"):
            raise DsdpoError(
                "score.antithetic false gives the reference its own draws: not with --reference-scores "
                "(scored on the policy's draws) or --objective per_draw (a loss per shared draw)"
            )
        if self.loss.supervised and (self.train.keep_best or "").startswith("eval/rewards/"):
            raise DsdpoError(
                f"train.keep_best {self.train.keep_best}: an SFT run has no rewards; "
                "use eval/loss or eval/accuracy"
            )
        if self.train.ref_sync_steps:
            # TR-DPO moves a reference engine towards the policy: there must be one to move.
            without_engine = [
                (self.model.reference_scores, "--reference-scores (fixed scores)"),
                (self.loss.reference_free, "--reference-free"),
                (self.model.lora_rank, "--lora-rank (the reference is the policy with its adapters off)"),
                (self.model.reference_path, "--ref-model (the refresh mixes the policy into its own start)"),
            ]
            for given, option in without_engine:
                if given:
                    raise DsdpoError(f"train.ref_sync_steps (TR-DPO) needs a reference engine: drop {option}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and, for strings from the command line, convert) one field's value."""
    hint = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in hint:
            return None
        raise DsdpoError(f"{name} may not be empty")
    for kind in (k for k in hint if k is not type(None)):
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif kind is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float and not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        elif kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in hint)
    raise DsdpoError(f"{name}: expected {expected}, got {value!r}")


def _section_from_dict(cls: type, values: dict[str, Any], section: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f"; known: {', '.join(names)}"
            raise DsdpoError(f"{source}: unknown field {section}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: {section}.{key}")
    return cls(**kwargs)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested sections; unknown sections or fields are errors naming them."""
    if not isinstance(data, dict):
        raise DsdpoError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise DsdpoError(f"{source}: unknown section {name!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise DsdpoError(f"{source}: section {name!r} must be a mapping of fields")
        sections[name] = _section_from_dict(hints[name], values, name, source)
    return Config(**sections)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON training config into nested dicts (not yet validated)."""
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such training config file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise DsdpoError(f"{file}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DsdpoError(
            f"{file}: expected a mapping of sections ({', '.join(SECTIONS)}), found a {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys ("score.budget": 4) on nested dicts; None values are left alone."""
    merged = {section: dict(values) for section, values in data.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:
            raise DsdpoError(f"override {dotted!r}: use section.field=value, e.g. score.budget=4")
        merged.setdefault(section, {})[key] = value
    return merged


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """`--set score.budget=4` pairs into a dict; values stay strings and are converted per field."""
    parsed = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise DsdpoError(f"--set {item!r}: expected section.field=value")
        parsed[key.strip()] = value.strip()
    return parsed
