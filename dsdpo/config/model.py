"""The model section (ModelConfig): which model trains, its reference, LoRA and frozen parameters."""

from __future__ import annotations

from dataclasses import dataclass

from dsdpo.errors import DsdpoError
from dsdpo.settings import setting


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
