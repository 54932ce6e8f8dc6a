"""The model families dsdpo knows by name, and the one place that holds each family's conventions.

A family's published checkpoints (config.json `model_type`) load into dsdpo's own implementation,
never their remote code: the published code does not load under transformers 5, the LLaDA code
before its 2025-10 update ignores the padding mask, and neither supports gradient checkpointing as
transformers does. The conventions are what the scorer, the sampler, LoRA and loading must agree on:

- mask token: the config's `mask_token_id`, else the family's published one;
- logit shift: Dream predicts token i at position i-1 (its sampler shifts the logits right by one,
  generation_utils.py: `logits = cat([logits[:, :1], logits[:, :-1]])`); LLaDA reads position i;
- stop tokens: where a generated answer ends (besides the tokenizer's EOS);
- LoRA targets: every linear layer of the blocks, never the output layer;
- trunk and head: where the hidden states end and the output layer starts (the scorer runs the
  head only at masked positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from transformers import PretrainedConfig

from dsdpo.families.dream import DreamConfig, DreamModel
from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's model_type
    config_class: type
    model_class: type
    mask_token_id: int  # the published one, when config.json names none
    logit_shift: int  # the logits of token i are read at position i - logit_shift (never below 0)
    stop_tokens: tuple[str, ...]
    lora_target_modules: str  # a PEFT regex over module names
    trunk: str  # attribute path of the module whose output is the final hidden states
    head: str  # attribute path of the output layer


LLADA = Family(
    name="LLaDA",
    model_type="llada",
    config_class=LLaDAConfig,
    model_class=LLaDAModelLM,
    mask_token_id=126336,
    logit_shift=0,
    stop_tokens=("<|eot_id|>", "<|endoftext|>"),
    lora_target_modules=r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    trunk="model",
    head="model.transformer.ff_out",
)
DREAM = Family(
    name="Dream",
    model_type="Dream",
    config_class=DreamConfig,
    model_class=DreamModel,
    mask_token_id=151666,
    logit_shift=1,
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    lora_target_modules=r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    trunk="model",
    head="lm_head",
)
FAMILIES = {family.model_type: family for family in (LLADA, DREAM)}


def family_of(config: PretrainedConfig | None) -> Family | None:
    """The family of a loaded config (or a model's config), None for any other model."""
    return FAMILIES.get(getattr(config, "model_type", None))


def family_of_folder(folder: str | Path) -> Family | None:
    """The family named by a model folder's config.json, read as JSON (no code runs)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return FAMILIES.get(config.get("model_type")) if isinstance(config, dict) else None


def family_of_model(model: nn.Module) -> Family | None:
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    return family_of(getattr(model, "config", None))


def source_positions(positions: Tensor, shift: int) -> Tensor:
    """Where the logits of the tokens at `positions` are read: `positions - shift`, and position 0
    reads itself (Dream's rule; a response never starts at 0, a prompt token precedes it)."""
    return (positions - shift).clamp(min=0) if shift else positions


def attribute(model: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        model = getattr(model, name)
    return model
