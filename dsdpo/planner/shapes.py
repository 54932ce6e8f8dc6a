"""The shape of a model and its parameter counts, from config.json alone.

The model is built on the meta device (no memory, no weights), so its parameter count is that of
the very module tree training loads, not a formula: tied weights count once, biases and norms count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from dsdpo.errors import DsdpoError
from dsdpo.families import FAMILIES


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int  # d
    layers: int  # N
    heads: int  # h
    kv_heads: int
    intermediate: int  # f, the gated MLP's width
    vocab: int  # rows of the output layer (V)
    parameters: int  # every parameter once (tied ones once), counted on the meta device
    parameter_sizes: tuple[int, ...]  # numel of each parameter
    largest_module: int  # parameters of the module with the most direct parameters (ZeRO gathers it whole)
    block_parameters: int  # parameters of one transformer block

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def largest_parameter(self) -> int:
        """Elements of the largest parameter (an NVMe parameter swap buffer must hold it)."""
        return max(self.parameter_sizes)

    def persistent(self, threshold: float) -> int:
        """Parameters ZeRO-3 keeps whole on every GPU: those of at most `threshold` elements."""
        return sum(size for size in self.parameter_sizes if size <= threshold)


def read_config(source: str | Path | PretrainedConfig | dict) -> PretrainedConfig:
    """A transformers config from a model folder, a config.json file, a dict or a config object; the
    families' configs (LLaDA, Dream) are dsdpo's own classes (no remote code runs)."""
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        data = dict(source)
        where = "config"
    else:
        path = Path(source)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise DsdpoError(f"{source}: no config.json (give a model folder or its config.json)")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise DsdpoError(f"{file}: not valid JSON: {err}") from err
        where = str(file)
    model_type = data.pop("model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type].config_class(**data)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise DsdpoError(f"{where}: model_type {model_type!r} is not one transformers knows: {err}") from None


def _meta_model(config: PretrainedConfig):
    from dsdpo.models import build_from_config

    with torch.device("meta"):
        return build_from_config(config)


def _blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise DsdpoError(f"{type(model).__name__}: found no list of transformer blocks")
    return max(lists, key=len)


def largest_parameter(source: str | Path | PretrainedConfig | dict) -> int:
    """Elements of the model's largest parameter, for any model (no block structure needed)."""
    return max(p.numel() for p in _meta_model(read_config(source)).parameters())


def model_shape(source: str | Path | PretrainedConfig | dict) -> ModelShape:
    config = read_config(source)
    model = _meta_model(config)
    sizes = tuple(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    blocks = _blocks(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "kv_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_size")  # noqa: B009
    output = model.get_output_embeddings()
    vocab = output.weight.shape[0] if output is not None else config.vocab_size
    return ModelShape(
        model_type=config.model_type,
        hidden=config.hidden_size,
        layers=len(blocks),
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        parameters=sum(sizes),
        parameter_sizes=sizes,
        largest_module=largest,
        block_parameters=sum(p.numel() for p in blocks[0].parameters()),
    )
