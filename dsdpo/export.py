"""Sharded ZeRO-3 checkpoint -> Hugging Face folder (config, tokenizer, safetensors).

Needs no GPU and no process group: DeepSpeed's zero_to_fp32 reads the shards, lazily (one tensor
is materialised at a time), and the weights are written one safetensors shard at a time, so memory
holds the fp32 partitions DeepSpeed maps plus one output shard, never a second copy of the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from dsdpo.checkpoint import LATEST_FILE, STATE_FILE, check_checkpoint, latest_checkpoint
from dsdpo.errors import DsdpoError
from dsdpo.models import DTYPES
from dsdpo.safe_load import check_checkpoint_pickles

# The engine wraps the model in MaskedTokenScorer, whose only child is `model`.
WRAPPER_PREFIX = "model."


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step_NNNNNN), or a run folder whose `latest` names one."""
    folder = Path(path)
    if (folder / LATEST_FILE).is_file() and not folder.name.startswith("step_"):
        newest, note = latest_checkpoint(folder)
        if note:
            print(f"warning: {note}", file=sys.stderr)
        folder = newest or folder
    check_checkpoint(folder)
    return folder


def is_checkpoint(path: str | Path) -> bool:
    folder = Path(path)
    return (folder / STATE_FILE).is_file() or (folder / LATEST_FILE).is_file()


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
    settings = json.loads(adapter.read_text())
    return settings["lora_alpha"] / settings["r"]


def _weight_sources(folder: Path) -> dict[str, tuple[torch.Size, Callable[[], torch.Tensor]]]:
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


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point weights to the output precision; integer buffers keep their type."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    trust_checkpoint: bool = False,
) -> Path:
    """Write a Hugging Face folder that transformers loads with the trained policy's weights."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = resolve_checkpoint(checkpoint)
    check_checkpoint_pickles(folder, trusted=trust_checkpoint)
    hf_files = folder / "hf"
    if not (hf_files / "config.json").is_file():
        raise DsdpoError(f"{hf_files}/config.json is missing: the checkpoint has no model config to export")
    if dtype not in DTYPES:
        raise DsdpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sources = _weight_sources(folder)
    empty = {name: torch.empty(shape, dtype=DTYPES[dtype]) for name, (shape, _) in sources.items()}
    split = split_torch_state_dict_into_shards(
        empty, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for shard_file, names in split.filename_to_tensors.items():
        shard = {name: _cast(sources[name][1](), DTYPES[dtype]) for name in names}
        save_file(shard, str(out / shard_file), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    # config.json is edited as JSON, never instantiated: exporting runs no code from the checkpoint.
    config = json.loads((hf_files / "config.json").read_text())
    config["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")  # "bfloat16", as transformers writes it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for item in hf_files.iterdir():  # tokenizer files, chat template, remote code
        if item.name not in ("config.json", ADAPTER_CONFIG) and item.is_file():  # adapters are merged
            (out / item.name).write_bytes(item.read_bytes())
    return out


def load_checkpoint_model(
    checkpoint: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    trust_checkpoint: bool = False,
) -> PreTrainedModel:
    """The trained policy of a checkpoint as a plain transformers model (for eval and scoring)."""
    from dsdpo.models import build_from_config, load_config

    folder = resolve_checkpoint(checkpoint)
    check_checkpoint_pickles(folder, trusted=trust_checkpoint)
    config = load_config(folder / "hf", trust_remote_code=trust_remote_code)
    model = build_from_config(config, trust_remote_code=trust_remote_code)
    weights = {
        name: _cast(make(), dtype or torch.float32) for name, (_, make) in _weight_sources(folder).items()
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    tied = {name for name in missing if _is_tied(model, name)}
    if unexpected or set(missing) - tied:
        raise DsdpoError(
            f"{folder}: the weights do not fit the model config (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(dtype) if dtype is not None else model


def _is_tied(model: PreTrainedModel, name: str) -> bool:
    """Whether parameter `name` shares storage with another parameter (a tied weight)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(
        p.data_ptr() == target.data_ptr() for other, p in params.items() if other != name
    )
