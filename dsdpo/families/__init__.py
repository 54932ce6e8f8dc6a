"""The model families dsdpo knows by name, and the one place that holds each family's conventions.

A family's published checkpoints (config.json `model_type`) load into dsdpo's own implementation,
never their remote code: the published code does not load under transformers 5, the LLaDA code
before its 2025-10 update ignores the padding mask, and neither supports gradient checkpointing as
transformers does. The conventions are what the scorer, the sampler, LoRA and loading must agree on:

- mask token: the config's `mask_token_id`, else the family's published one;
- logit shift: Dream predicts token i at position i-1 (its sampler shifts the logits right by one,
  generation_utils.py: `logits = cat([logits[:, :1], logits[:, :-1]])`); LLaDA reads position i;
- stop tokens: where a generated answer ends (besides the tokenizer's EOS);
- LoRA targets: every linear layer of the blocks, never the output layer; for LLaDA-MoE and
  LLaDA 2.x, never their routed experts or router either (see LLADA_MOE);
- trunk and head: where the hidden states end and the output layer starts (the scorer runs the
  head only at masked positions);
- blocks: a block-diffusion model (SDAR, LLaDA 2.x) names the config field of its block length and
  its published sampler (dsdpo.evaluation.block_sampler); its score is the block-diffusion ELBO
  (dsdpo.objective.blocks,
  docs/design.md, "The block-diffusion ELBO");
- sampler: the gen length and block length its authors evaluate with (GSM8K), the sampler's defaults
  for its models (dsdpo.config.SamplerConfig.resolved); steps default to the gen length.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from transformers import PretrainedConfig

from dsdpo.evaluation.block_sampler import BlockSampling
from dsdpo.families.dream import DreamConfig, DreamModel
from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
from dsdpo.families.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dsdpo.families.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from dsdpo.families.sdar import SDARConfig, SDARForCausalLM


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's model_type (LLaDA-MoE: see config_key)
    config_class: type
    model_class: type
    mask_token_id: int  # the published one, when config.json names none
    logit_shift: int  # the logits of token i are read at position i - logit_shift (never below 0)
    stop_tokens: tuple[str, ...]
    lora_target_modules: str  # a PEFT regex over module names
    trunk: str  # attribute path of the module whose output is the final hidden states
    head: str  # attribute path of the output layer
    block_size_field: str | None = None  # a block-diffusion model's config field of its block length
    gen_length: int | None = None  # the published sampler's answer length (None: dsdpo's default)
    block_length: int | None = None  # the published sampler's block length (None: dsdpo's default)
    block_sampling: BlockSampling | None = None  # a block-diffusion model's published sampler


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
    # LLaDA-8B-Instruct's GSM8K setting in LLaDA's OpenCompass configs (github ML-GSAI/LLaDA,
    # opencompass/examples, GSM8K: eval_cfg gen_length 256, gen_blocksize 8, gen_steps 256).
    gen_length=256,
    block_length=8,
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
    # Dream-v0-Instruct-7B's GSM8K setting (github DreamLM/Dream, eval_instruct/eval.sh, gsm8k_cot:
    # max_new_tokens=256, diffusion_steps=256); Dream's sampler has no blocks: one block of 256.
    gen_length=256,
    block_length=256,
)
# LoRA on LLaDA-MoE adapts attention, the dense MLPs and the shared experts, never the routed
# experts nor the router `mlp.gate`: the routed experts are most of the parameters (64 per layer in
# the released model) and each sees only the tokens routed to it (8 of 64), so adapters there would
# multiply the adapter count by the expert count for a fraction of the tokens each; an adapted
# router would move the load away from what the (frozen) expert bias balances. Name the experts in
# --lora-target-modules to include them.
LLADA_MOE = Family(
    name="LLaDA-MoE",
    model_type="lladamoe",  # dllm's name for it; the released config.json says "llada" (config_key)
    config_class=LLaDAMoEConfig,
    model_class=LLaDAMoEModelLM,
    mask_token_id=156895,  # <|mask|> of the released tokenizer (docs/published_code.md, "llada_moe")
    logit_shift=0,  # modeling_lladamoe.py:1141, dllm's sampler right_shift_logits=False
    stop_tokens=("<|role_end|>", "<|endoftext|>"),  # end of a turn in its (Ling) chat template; EOS
    lora_target_modules=(
        r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|(mlp|shared_expert)\.(gate|up|down)_proj)"
    ),
    trunk="model",
    head="lm_head",
)
# SDAR's LoRA targets are Dream's (the same Qwen decoder layer names): every linear layer of the
# decoder layers (q/k/v/o and the gated MLP), never lm_head; its q/k norms are not linear layers.
SDAR = Family(
    name="SDAR",
    model_type="sdar",
    config_class=SDARConfig,
    model_class=SDARForCausalLM,
    mask_token_id=151669,  # config.json's mask_token_id (docs/published_code.md, "sdar")
    logit_shift=0,  # modeling_sdar.py:1210; generate.py reads the block's own positions (132-144)
    stop_tokens=("<|im_end|>", "<|endoftext|>"),  # Qwen3's end of turn and EOS (its chat template)
    lora_target_modules=DREAM.lora_target_modules,
    trunk="model",
    head="lm_head",
    block_size_field="block_size",  # config.json; generate.py's block_length (4 in the chat models)
    # SDAR's generate.py (github JetAstra/SDAR, /work/shared/reference-models/sdar): --block_length 4
    # --denoising_steps 4, one token a step (dsdpo's steps = gen length); no published gen length.
    block_length=4,
    block_sampling=BlockSampling(remasking="low_confidence_static"),
)
# LoRA on LLaDA 2.x follows LLaDA-MoE's rule: attention (the fused query_key_value and dense), the
# dense MLPs of the first layers and the shared experts, never the routed experts nor the router
# `mlp.gate` (not a linear layer in the published code either: a bare weight and the expert bias).
LLADA2 = Family(
    name="LLaDA 2.x",
    model_type="llada2_moe",  # the model page's; dFactory's fused-expert copy ("llada2_moe_veomni") is not
    config_class=LLaDA2MoeConfig,
    model_class=LLaDA2MoeModelLM,
    mask_token_id=156895,  # generate()'s mask_id, dFactory's training (docs/published_code.md, "llada2_moe")
    logit_shift=0,  # modeling_llada2_moe.py:1096-1102; generate() reads the block's own positions (1382)
    stop_tokens=LLADA_MOE.stop_tokens,  # the same (Ling) tokenizer and chat template; EOS 156892
    lora_target_modules=(
        r".*\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(shared_experts\.)?(gate|up|down)_proj)"
    ),
    trunk="model",
    head="lm_head",
    block_size_field="block_size",  # dsdpo's field; 32 when absent (dsdpo.families.llada2)
    # generate()'s block_length 32, one token a step (modeling_llada2_moe.py:1265-1266); its gen_length
    # default (2048) is a ceiling for chat, not an evaluation setting: dsdpo's default stands.
    block_length=32,
    block_sampling=BlockSampling(
        remasking="low_confidence_dynamic",
        confidence_threshold=0.95,
        minimal_topk=1,
        keep_at_most_masked=True,
        greedy_by_argmax=True,
    ),
)
FAMILIES = {family.model_type: family for family in (LLADA, DREAM, LLADA_MOE, SDAR, LLADA2)}


def config_key(model_type: str | None, fields: Mapping[str, object]) -> str | None:
    """The FAMILIES key of a config: its model_type, except that LLaDA-MoE's released config.json
    says "llada" like dense LLaDA's; it is the one with MoE fields (`num_experts`, which no dense
    LLaDA config has: configuration_llada.py), and dllm's copy of it says "lladamoe"."""
    if model_type == "llada" and "num_experts" in fields:
        return LLADA_MOE.model_type
    return model_type


def family_of_config_dict(config: Mapping[str, object]) -> Family | None:
    """The family of a config.json's content (dsdpo plan reads configs this way)."""
    return FAMILIES.get(config_key(config.get("model_type"), config))


def family_of(config: PretrainedConfig | None) -> Family | None:
    """The family of a loaded config (or a model's config), None for any other model."""
    return FAMILIES.get(config_key(getattr(config, "model_type", None), vars(config) if config else {}))


def family_of_folder(folder: str | Path) -> Family | None:
    """The family named by a model folder's config.json, read as JSON (no code runs)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return family_of_config_dict(config) if isinstance(config, dict) else None


def family_of_model(model: nn.Module) -> Family | None:
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    return family_of(getattr(model, "config", None))


def block_size_of(config: PretrainedConfig | None) -> int | None:
    """A block-diffusion model's block length (its family names the config field), else None."""
    family = family_of(config)
    if family is None or family.block_size_field is None:
        return None
    return int(getattr(config, family.block_size_field))


def block_size_of_model(model: nn.Module) -> int | None:
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    return block_size_of(getattr(model, "config", None))


def lora_targets(option: str, family: Family | None) -> str | list[str]:
    """PEFT's target_modules for --lora-target-modules: "auto" is the family's block layers (never
    the output layer), or "all-linear" for other models."""
    if option == "auto":
        return family.lora_target_modules if family else "all-linear"
    return option if option == "all-linear" else [name.strip() for name in option.split(",")]


def source_positions(positions: Tensor, shift: int) -> Tensor:
    """Where the logits of the tokens at `positions` are read: `positions - shift`, and position 0
    reads itself (Dream's rule; a response never starts at 0, a prompt token precedes it)."""
    return (positions - shift).clamp(min=0) if shift else positions


def attribute(model: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        model = getattr(model, name)
    return model
