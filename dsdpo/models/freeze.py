"""Selective freezing of the policy (--freeze): parameters that get no gradient and no optimizer state.

A spec is comma-separated items:

    embeddings   the input embedding matrix
    head         the output layer (the same matrix as the embeddings when they are tied)
    layers:K     the first K transformer blocks (the model's ModuleList of num_hidden_layers blocks)
    REGEX        every parameter whose name matches (re.search), e.g. "attn_norm|ff_norm"

Freezing happens before the DeepSpeed engine exists, so ZeRO-3 keeps no fp32 master copy, no Adam
moments and no gradient partition for a frozen parameter; it stays in the module's weights (and in
checkpoints and exports) unchanged. Under Adam in fp32 that saves 16 bytes per frozen parameter
(master weight, two moments, gradient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from dsdpo.errors import DsdpoError

OPTIMIZER_BYTES_PER_PARAMETER = 16  # fp32 master weight + Adam's m and v + the fp32 gradient


def _numel(param) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions hold a shard only


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList whose length is the config's number of layers."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise DsdpoError("freeze: layers:K needs a model whose blocks form one list of num_hidden_layers")


def frozen_names(model: nn.Module, spec: str) -> set[str]:
    """The names of the parameters that `spec` freezes (module docstring)."""
    names = {id(p): n for n, p in model.named_parameters()}
    chosen: set[str] = set()
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in ("embeddings", "head"):
            module = model.get_input_embeddings() if item == "embeddings" else model.get_output_embeddings()
            matched = {names[id(p)] for p in module.parameters() if id(p) in names}
        elif item.startswith("layers:"):
            try:
                count = int(item.removeprefix("layers:"))
            except ValueError as err:
                raise DsdpoError(f"model.freeze: {item!r}: K of layers:K must be a whole number") from err
            blocks = _blocks(model)
            if not 0 < count <= len(blocks):
                raise DsdpoError(f"model.freeze: {item!r}: the model has {len(blocks)} layers")
            matched = {names[id(p)] for block in blocks[:count] for p in block.parameters()}
        else:
            try:
                pattern = re.compile(item)
            except re.error as err:
                raise DsdpoError(f"model.freeze: {item!r} is not a regular expression ({err})") from err
            matched = {name for name in names.values() if pattern.search(name)}
        if not matched:
            raise DsdpoError(f"model.freeze: {item!r} matches no parameter of the model")
        chosen |= matched
    return chosen


@dataclass(frozen=True)
class FreezeReport:
    frozen: int  # parameters (elements) frozen
    total: int

    def summary(self) -> str:
        saved = self.frozen * OPTIMIZER_BYTES_PER_PARAMETER / 2**30
        trainable = (self.total - self.frozen) * OPTIMIZER_BYTES_PER_PARAMETER / 2**30
        return (
            f"frozen: {self.frozen / 1e6:.2f}M of {self.total / 1e6:.2f}M parameters; optimizer state "
            f"and gradients {trainable:.2f} GiB instead of {trainable + saved:.2f} GiB"
        )


def freeze(model: nn.Module, spec: str) -> FreezeReport:
    """Turn off the gradients of the parameters `spec` names; the report counts what that saves."""
    names = frozen_names(model, spec)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    frozen_ids = {id(p) for n, p in model.named_parameters() if n in names}
    return FreezeReport(
        frozen=sum(_numel(p) for p in params if id(p) in frozen_ids), total=sum(_numel(p) for p in params)
    )
