"""Sharded ZeRO-3 checkpoint -> Hugging Face folder (config, tokenizer, safetensors).

Needs no GPU and no process group: DeepSpeed's zero_to_fp32 reads the shards, lazily (one tensor
is materialised at a time), and the weights are written one safetensors shard at a time, so memory
holds the fp32 partitions DeepSpeed maps plus one output shard, never a second copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, PreTrainedModel

from dsdpo.checkpoint import LATEST_FILE, check_checkpoint
from dsdpo.errors import DsdpoError
from dsdpo.models import DTYPES

# The engine wraps the model in MaskedTokenScorer, whose only child is `model`.
WRAPPER_PREFIX = "model."


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step_NNNNNN), or a run folder whose `latest` names one."""
    folder = Path(path)
    if (folder / LATEST_FILE).is_file() and not folder.name.startswith("step_"):
        folder = folder / (folder / LATEST_FILE).read_text().strip()
    check_checkpoint(folder)
    return folder


def is_checkpoint(path: str | Path) -> bool:
    folder = Path(path)
    return (folder / "dsdpo_state.json").is_file() or (folder / LATEST_FILE).is_file()


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


def _materialise(lazy_tensors: dict[str, object], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import to_torch_tensor

    return to_torch_tensor(lazy_tensors, dtype=dtype)


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "bf16", max_shard_size: str = "5GB"
) -> Path:
    """Write a Hugging Face folder that transformers loads with the trained policy's weights."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = resolve_checkpoint(checkpoint)
    hf_files = folder / "hf"
    if not (hf_files / "config.json").is_file():
        raise DsdpoError(f"{hf_files}/config.json is missing: the checkpoint has no model config to export")
    if dtype not in DTYPES:
        raise DsdpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    lazy = _lazy_weights(folder)
    empty = {name: torch.empty(t.shape, dtype=DTYPES[dtype]) for name, t in lazy.items()}
    split = split_torch_state_dict_into_shards(
        empty, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for shard_file, names in split.filename_to_tensors.items():
        shard = _materialise({name: lazy[name] for name in names}, DTYPES[dtype])
        save_file(shard, str(out / shard_file), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    config = AutoConfig.from_pretrained(hf_files, trust_remote_code=True)
    config.dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    config.save_pretrained(out)
    for item in hf_files.iterdir():  # tokenizer files, chat template, remote code
        if item.name != "config.json" and item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    return out


def load_checkpoint_model(
    checkpoint: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The trained policy of a checkpoint as a plain transformers model (for eval and scoring)."""
    from dsdpo.models import model_class_for

    folder = resolve_checkpoint(checkpoint)
    config = AutoConfig.from_pretrained(folder / "hf", trust_remote_code=trust_remote_code)
    model = model_class_for(config, trust_remote_code=trust_remote_code).from_config(
        config, trust_remote_code=trust_remote_code
    )
    weights = _materialise(_lazy_weights(folder), dtype or torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    tied = {name for name in missing if name not in weights and _is_tied(model, name)}
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
