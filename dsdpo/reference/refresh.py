"""TR-DPO's reference refresh (Gorbatovski et al. 2024, "Learn your reference model for real good
alignment"): every τ optimizer steps the reference engine moves towards the policy,

    θ_ref ← α·θ + (1 − α)·θ_ref        (α = 1: a hard update, the reference becomes the policy)

(TRL's sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps). Both engines are ZeRO-3: one
parameter at a time is gathered whole, mixed on rank 0 and partitioned again, whatever the offload.
A refreshed reference is no longer the starting model, so checkpoints carry it (reference.safetensors,
full tensors, written before the checkpoint is marked complete) and a resumed run reloads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsdpo.errors import DsdpoError
from dsdpo.runtime.zero import gathered

REFERENCE_WEIGHTS = "reference.safetensors"


def _pairs(policy_engine, reference_engine):
    policy = dict(policy_engine.module.named_parameters())
    reference = dict(reference_engine.module.named_parameters())
    if policy.keys() != reference.keys():
        raise DsdpoError("the reference refresh needs a reference of the policy's architecture")
    return [(policy[name], reference[name]) for name in reference]


@torch.no_grad()
def mix_reference(policy_engine, reference_engine, alpha: float, *, is_rank0: bool) -> None:
    """θ_ref ← α·θ + (1 − α)·θ_ref (module docstring). Every rank calls it (gathers are collective)."""
    for policy_param, reference_param in _pairs(policy_engine, reference_engine):
        with (
            gathered([policy_param]),
            gathered([reference_param], modifier_rank=0),
        ):
            if is_rank0:
                mixed = alpha * policy_param.data.float() + (1 - alpha) * reference_param.data.float()
                reference_param.data.copy_(mixed.to(reference_param.dtype))


@torch.no_grad()
def save_reference(reference_engine, folder: Path, *, is_rank0: bool) -> None:
    """The reference's full weights to folder/reference.safetensors (rank 0 writes; all ranks call)."""
    weights = {}
    for name, param in reference_engine.module.named_parameters():
        with gathered([param]):
            if is_rank0:
                weights[name] = param.data.detach().cpu().clone()
    if is_rank0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / REFERENCE_WEIGHTS))


@torch.no_grad()
def load_reference(reference_engine, folder: Path, *, is_rank0: bool) -> None:
    """Put folder/reference.safetensors back into the reference engine (all ranks call)."""
    path = folder / REFERENCE_WEIGHTS
    if not path.is_file():
        raise DsdpoError(
            f"{path} is missing: the checkpoint was written after a reference refresh (TR-DPO) and "
            "cannot resume without the refreshed reference"
        )
    with safe_open(str(path), framework="pt") as stored:
        names = set(stored.keys())
        for name, param in reference_engine.module.named_parameters():
            if name not in names:
                raise DsdpoError(f"{path}: no weight {name!r}; it was not written for this model")
            with gathered([param], modifier_rank=0):
                if is_rank0:
                    param.data.copy_(stored.get_tensor(name).to(param.dtype))
