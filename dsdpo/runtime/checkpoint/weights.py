"""Reading a checkpoint's weights (dsdpo.models.loading.load_model, dsdpo export): the fp32 tensors of
DeepSpeed's ZeRO shards, one at a time, with a LoRA run's adapters merged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from dsdpo.errors import DsdpoError

# The engine wraps the model in MaskedTokenScorer, whose only child is `model`.
WRAPPER_PREFIX = "model."


def _lazy_weights(folder: Path) -> dict[str, object]:
    """name -> lazy fp32 tensor, with the wrapper prefix removed and tied duplicates dropped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DsdpoError(f"{folder}: cannot read the DeepSpeed shards ({err})") from err
    weights, seen = {}, set()
    for name, tensor in lazy.items():
        if id(tensor) in seen:  # a tied weight (e.g. lm_head = embeddings): saved once, re-tied on load
            continue
        seen.add(id(tensor))
        weights[name.removeprefix(WRAPPER_PREFIX)] = tensor
    return weights


PEFT_PREFIX = "base_model.model."  # where PEFT puts the base model's own parameter names
ADAPTER_CONFIG = "adapter_config.json"  # written beside config.json by a LoRA run


def _lora_scale(hf_files: Path) -> float | None:
    """alpha / r of a LoRA run's adapters (PEFT's scaling), or None for a full fine-tuning run."""
    adapter = hf_files / ADAPTER_CONFIG
    if not adapter.is_file():
        return None
    try:
        settings = json.loads(adapter.read_text())
        alpha, rank = settings["lora_alpha"], settings["r"]
    except (ValueError, KeyError, TypeError) as err:
        raise DsdpoError(f"{adapter}: not a LoRA adapter config ({err})") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise DsdpoError(f"{adapter}: r must be a positive integer and lora_alpha a number, got r={rank!r}")
    return alpha / rank


def weight_sources(folder: Path) -> dict[str, tuple[torch.Size, Callable[[], torch.Tensor]]]:
    """Output name -> (shape, a function that materialises the fp32 tensor), one tensor at a time.

    A LoRA run's adapters are merged into the weights they adapt: W + (alpha/r)·B·A.
    """
    lazy = _lazy_weights(folder)
    scale = _lora_scale(folder / "hf")
    sources = {}
    for name, tensor in lazy.items():
        if scale is None:
            sources[name] = (tensor.shape, tensor.contiguous)
        elif ".lora_A." in name or ".lora_B." in name:
            continue  # folded into their base weight below
        elif name.endswith(".base_layer.weight"):
            stem = name.removesuffix(".base_layer.weight")
            a, b = lazy[f"{stem}.lora_A.default.weight"], lazy[f"{stem}.lora_B.default.weight"]
            merged = lambda w=tensor, a=a, b=b: w.contiguous() + scale * (b.contiguous() @ a.contiguous())  # noqa: E731
            sources[f"{stem.removeprefix(PEFT_PREFIX)}.weight"] = (tensor.shape, merged)
        else:
            sources[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = (
                tensor.shape,
                tensor.contiguous,
            )
    return sources


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point weights to the output precision; integer buffers keep their type."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
