"""Loading masked-diffusion language models and their tokenizers from local folders.

Three kinds load here: masked-LM models (`AutoModelForMaskedLM`: BERT, ModernBERT ...), decoders
with bidirectional attention (a Gemma/Llama-family config with `use_bidirectional_attention`), and
`trust_remote_code` models such as LLaDA and Dream. Nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dsdpo.errors import DsdpoError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model_folder(path: str | Path) -> Path:
    """The folder holding config.json (and the tokenizer): the model folder, or a checkpoint's hf/."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        from dsdpo.export import is_checkpoint, resolve_checkpoint

        if is_checkpoint(folder):
            folder = resolve_checkpoint(folder) / "hf"
    if not folder.is_dir():
        raise DsdpoError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise DsdpoError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def load_config(path: str | Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    folder = check_model_folder(path)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        hint = (
            "" if trust_remote_code else " (a model with its own code, like LLaDA, needs --trust-remote-code)"
        )
        raise DsdpoError(f"{folder}/config.json: {err}{hint}") from err


def model_class_for(config: PretrainedConfig, *, trust_remote_code: bool = False):
    """The Auto class that builds the denoiser: the masked-LM head where there is one."""
    architectures = config.architectures or []
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        # LLaDA and Dream register their denoiser under AutoModel (and sometimes AutoModelForCausalLM).
        for name, cls in (("AutoModelForMaskedLM", AutoModelForMaskedLM), ("AutoModel", AutoModel)):
            if name in auto_map:
                return cls
        return AutoModelForCausalLM
    if any(arch.endswith("ForMaskedLM") for arch in architectures):
        return AutoModelForMaskedLM
    if not getattr(config, "use_bidirectional_attention", False):
        log.warning(
            "%s has causal attention: it is not a masked diffusion model, and its scores will be poor. "
            "Set use_bidirectional_attention in its config if it was trained as a denoiser.",
            config.model_type,
        )
    return AutoModelForCausalLM


def load_model(
    path: str | Path, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load the denoiser in `path` for scoring or training: a Hugging Face folder, or a dsdpo
    checkpoint (a step_NNNNNN folder, or a run folder whose `latest` names one)."""
    config = load_config(path, trust_remote_code=trust_remote_code)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DsdpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not (Path(path) / "config.json").is_file():  # a checkpoint: weights from the ZeRO shards
        from dsdpo.export import load_checkpoint_model

        return load_checkpoint_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    cls = model_class_for(config, trust_remote_code=trust_remote_code)
    return cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code)


def disable_dropout(model: torch.nn.Module) -> None:
    """Make the model deterministic in train mode (train mode keeps activation checkpointing on).

    The chunked exact gradient recomputes every score in a second pass: both passes must compute
    the same function. (TRL's DPO disables dropout too.)
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    folder = check_model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DsdpoError(f"{folder}: no usable tokenizer ({err})") from err


def resolve_mask_token_id(
    explicit: int | None, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> int:
    """The mask token: an explicit option, else the config's `mask_token_id`, else the tokenizer's."""
    if explicit is not None:
        return int(explicit)
    from_config = getattr(config, "mask_token_id", None)
    if from_config is not None:
        return int(from_config)
    if tokenizer is not None and tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    raise DsdpoError(
        "no mask token id: the model config has no mask_token_id and the tokenizer no mask token; "
        "give it with --mask-token-id (LLaDA uses 126336)"
    )
