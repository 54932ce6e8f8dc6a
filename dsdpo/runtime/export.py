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

from dsdpo.errors import DsdpoError
from dsdpo.models.loading import DTYPES, check_config_fits_weights, load_checkpoint_model
from dsdpo.runtime.checkpoint import (
    ADAPTER_CONFIG,
    cast_weight,
    is_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
    weight_sources,
)

# Re-exported: checkpoint reading lives in dsdpo.runtime.checkpoint, model building in dsdpo.models.loading.
__all__ = ["export_checkpoint", "is_checkpoint", "load_checkpoint_model", "resolve_checkpoint"]


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
    verify_checkpoint(folder, trust_checkpoint=trust_checkpoint)
    hf_files = folder / "hf"
    if not (hf_files / "config.json").is_file():
        raise DsdpoError(f"{hf_files}/config.json is missing: the checkpoint has no model config to export")
    if dtype not in DTYPES:
        raise DsdpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sources = weight_sources(folder)
    check_config_fits_weights(folder, sources)
    empty = {name: torch.empty(shape, dtype=DTYPES[dtype]) for name, (shape, _) in sources.items()}
    split = split_torch_state_dict_into_shards(
        empty, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for shard_file, names in split.filename_to_tensors.items():
        shard = {name: cast_weight(sources[name][1](), DTYPES[dtype]) for name in names}
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
