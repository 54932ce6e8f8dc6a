"""The shape of a model and its parameter counts, from config.json alone.

The model is built on the meta device (no memory, no weights), so its parameter count is that of
the very module tree training loads, not a formula: tied weights count once, biases and norms count.

A mixture of experts has TOTAL parameters (every expert: what ZeRO-3 partitions, offloads, and
keeps gradients and optimizer states of) and ACTIVE ones (those a token runs through: what compute
and activations follow). The counts are read off the module tree, for any family whose MoE layers
follow this protocol (LLaDA-MoE, and the published LLaDA 2.x code's layout):
- an MoE layer is a module with an `experts` nn.ModuleList of equally shaped experts;
- it sends each token to `top_k` of them: its own `top_k` attribute, else its router's (`gate.top_k`,
  as LLaDA 2.x publishes it), else the config's `num_experts_per_tok`;
- every other module of a block (attention, router, shared experts, dense MLPs) runs for every token;
- a gated MLP (dense, shared or one expert) names its output projection `down_proj`: its width is
  `down_proj.in_features`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from dsdpo.errors import DsdpoError
from dsdpo.families import FAMILIES, block_size_of, family_of, family_of_config_dict, lora_targets

# The names of a per-head query norm: Qwen3's, SDAR's and LLaDA-MoE's; LLaDA 2.x's published one.
QK_NORMS = ("q_norm", "query_layernorm")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int  # d
    layers: int  # N
    heads: int  # h
    kv_heads: int
    intermediate: int  # f, the gated MLP width a token passes through (MoE: top-k experts + shared)
    vocab: int  # rows of the output layer (V)
    parameters: int  # every parameter once (tied ones once), counted on the meta device
    parameter_sizes: tuple[int, ...]  # numel of each parameter
    largest_module: int  # parameters of the module with the most direct parameters (ZeRO gathers it whole)
    block_parameters: int  # parameters of the largest transformer block (ZeRO-3 gathers one at a time)
    active_block_parameters: int  # of all blocks, those one token runs through (MoE: its top-k experts)
    active_parameters: int  # all parameters but the experts a token's router passes over
    experts: int = 0  # experts of the widest MoE layer (0: dense)
    experts_per_token: int = 0  # top-k of that layer: each token's input is copied to k experts
    block_size: int | None = None  # a block-diffusion model's block: its rows go as [noised ; clean]
    head_size: int | None = None  # config.json's head_dim, where heads x head_dim need not be d (Qwen3)
    qk_norms: bool = False  # RMS norms of each head's queries and keys (QK_NORMS)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """d_q: the width of the queries and of the attention's output (d unless head_dim says otherwise)."""
        return self.heads * self.head_dim

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
    if not isinstance(data, dict):
        raise DsdpoError(f"{where}: expected a JSON object of model settings, got {type(data).__name__}")
    family = family_of_config_dict(data)  # by model_type and fields (LLaDA-MoE says "llada" too)
    model_type = data.pop("model_type", None)
    if family is not None:
        return family.config_class(**data)
    if model_type not in CONFIG_MAPPING:  # transformers' own message lists every model type it knows
        raise DsdpoError(
            f"{where}: model_type {model_type!r} is not one transformers knows, nor a dsdpo family's "
            f"({', '.join(sorted(FAMILIES))})"
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise DsdpoError(f"{where}: model_type {model_type!r}, settings that make no config: {err}") from None


def _meta_model(config: PretrainedConfig):
    from dsdpo.models.loading import build_from_config

    # A config of the folder's own code was loaded with --trust-remote-code: its model is that code too.
    remote = type(config).__module__.startswith("transformers_modules")
    try:
        with torch.device("meta"):
            return build_from_config(config, trust_remote_code=remote)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as err:
        raise DsdpoError(f"model_type {config.model_type!r}: these settings build no model: {err}") from None


def _blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList with the most parameters (a block's list
    of experts is a ModuleList too, and can be longer)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise DsdpoError(f"{type(model).__name__}: found no list of transformer blocks")
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def _moe_layers(block: torch.nn.Module, config: PretrainedConfig) -> list[tuple[torch.nn.Module, int]]:
    """(layer, top-k) of each mixture-of-experts layer in `block` (module docstring's protocol)."""
    layers = []
    for module in block.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.ModuleList) or not len(experts):
            continue
        top_k = getattr(module, "top_k", None) or getattr(getattr(module, "gate", None), "top_k", None)
        layers.append((module, int(top_k or config.num_experts_per_tok)))
    return layers


def _idle_expert_parameters(block: torch.nn.Module, config: PretrainedConfig) -> int:
    """Parameters of the experts a token's router passes over in `block`."""
    idle = 0
    for layer, top_k in _moe_layers(block, config):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        idle += max(len(layer.experts) - top_k, 0) * per_expert
    return idle


def _gated_width(module: torch.nn.Module) -> int:
    return module.down_proj.in_features


def _moe_mlp_width(block: torch.nn.Module, config: PretrainedConfig) -> int:
    """The gated MLP width a token passes through in `block`: top-k experts of each MoE layer, and
    every gated MLP outside the expert lists (shared experts, a dense MLP) side by side."""
    layers = _moe_layers(block, config)
    in_experts = {id(m) for layer, _ in layers for m in layer.experts.modules()}
    routed = sum(top_k * _gated_width(layer.experts[0]) for layer, top_k in layers)
    others = sum(
        _gated_width(module)
        for module in block.modules()
        if id(module) not in in_experts and isinstance(getattr(module, "down_proj", None), torch.nn.Linear)
    )
    return routed + others


def _mlp_width(config: PretrainedConfig, blocks: torch.nn.ModuleList) -> int:
    """f of the widest block: the config's for a dense model; for a mixture of experts the module
    tree's (a first dense layer can be wider than a token's top-k experts and shared expert)."""
    if not any(_moe_layers(block, config) for block in blocks):
        return getattr(config, "intermediate_size", None) or config.ffn_size
    return max(_moe_mlp_width(block, config) for block in blocks)


def _widest_moe_layer(blocks: torch.nn.ModuleList, config: PretrainedConfig) -> tuple[int, int]:
    """(experts, top-k) of the MoE layer with the most experts; (0, 0) for a dense model."""
    layers = [(len(layer.experts), top_k) for block in blocks for layer, top_k in _moe_layers(block, config)]
    return max(layers, default=(0, 0))


def largest_parameter(source: str | Path | PretrainedConfig | dict) -> int:
    """Elements of the model's largest parameter, for any model (no block structure needed)."""
    return max(p.numel() for p in _meta_model(read_config(source)).parameters())


def model_shape(source: str | Path | PretrainedConfig | dict) -> ModelShape:
    config = read_config(source)
    model = _meta_model(config)
    sizes = tuple(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    blocks = _blocks(model)
    idle = sum(_idle_expert_parameters(block, config) for block in blocks)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "kv_heads", None) or heads
    intermediate = _mlp_width(config, blocks)
    experts, experts_per_token = _widest_moe_layer(blocks, config)
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
        block_parameters=max(sum(p.numel() for p in block.parameters()) for block in blocks),
        active_block_parameters=sum(p.numel() for p in blocks.parameters()) - idle,
        active_parameters=sum(sizes) - idle,
        experts=experts,
        experts_per_token=experts_per_token,
        block_size=block_size_of(config),
        head_size=getattr(config, "head_dim", None),
        qk_norms=any(name.rsplit(".", 1)[-1] in QK_NORMS for name, _ in blocks.named_modules()),
    )


def lora_parameters(
    source: str | Path | PretrainedConfig | dict, rank: int, target_modules: str = "auto"
) -> int:
    """Parameters of rank-`rank` LoRA adapters, r·(inputs + outputs) for each linear layer PEFT would
    adapt (its matching rules: a regex matches the whole module name, a list entry its last parts;
    "all-linear" is every linear layer but the output layer)."""
    config = read_config(source)
    model = _meta_model(config)
    targets = lora_targets(target_modules, family_of(config))
    output = model.get_output_embeddings()

    def adapted(name: str, module: torch.nn.Module) -> bool:
        if targets == "all-linear":
            return module is not output
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == target or name.endswith(f".{target}") for target in targets)

    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and adapted(name, module)
    )
