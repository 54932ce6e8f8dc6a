"""Shared helpers for tests that run real DeepSpeed engines on the CPU accelerator."""

import copy
import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from dsdpo.config import ModelConfig
from dsdpo.objective.draws import DrawKey, sample_draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.gradient import preference_micro_step
from dsdpo.objective.losses import LossConfig
from dsdpo.reference.interface import as_reference
from dsdpo.runtime.ds_config import resolve_ds_config
from dsdpo.runtime.engine import build_engines, init_distributed

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = json.loads((REPO / "ds_configs" / "cpu.json").read_text())


def cpu_ds_config(micro: int = 1, accumulation: int = 1, **zero) -> dict:
    """ds_configs/cpu.json with batch sizes, a constant learning rate and no clipping, for tests.

    Adam with eps = 1 updates by lr·g/(|g| + 1) ≈ lr·g for the small gradients here: weights after a
    step are then a smooth function of the gradient, so comparing them compares gradients (with the
    usual eps, Adam's first step is lr·sign(g) and rounding noise in a zero gradient flips signs).
    """
    config = copy.deepcopy(CPU_CONFIG)
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation)
    config["optimizer"]["params"].update(lr=1.0, eps=1.0)
    config.pop("gradient_clipping")
    config.pop("scheduler")
    config["zero_optimization"].update(zero)
    return config


def engines_for(model_dir, ds_config: dict, **model_options):
    init_distributed()
    resolved = resolve_ds_config(ds_config, world_size=1, total_steps=10)
    return build_engines(ModelConfig(path=str(model_dir), **model_options), resolved)


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 engine, gathered whole."""
    weights = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone().float()
    return weights


def full_gradient(engine) -> torch.Tensor:
    """The step's accumulated gradient, every parameter gathered and flattened into one fp32 vector.
    With an offloaded optimizer DeepSpeed copies the accumulation buffer into the optimizer's fp32
    gradient only at the boundary, which engine.step() would then consume: finalize it, read it."""
    engine.optimizer.finalize_gradient_accumulation_boundary()
    return torch.cat([safe_get_full_grad(p).float().flatten() for p in engine.module.parameters()])


MASK = 4  # the tiny tokenizer's [MASK]
PAIRS = [
    ("2+3=", "5", "6"),
    ("7-1=", "6 ok", "8"),
    ("1+1=", "2", "3 no"),
    ("4*2=", "8", "9"),
]


def pair_batch(tokenizer, indices) -> tuple[ScoringBatch, list[DrawKey]]:
    """PAIRS[indices] as rows 0..P-1 prompt+chosen, P..2P-1 prompt+rejected, right padded; their keys."""
    sequences, responses = [], []
    for column in (1, 2):
        for i in indices:
            prompt, response = tokenizer(PAIRS[i][0]).input_ids, tokenizer(PAIRS[i][column]).input_ids
            sequences.append(prompt + response)
            responses.append([0] * len(prompt) + [1] * len(response))
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    response = torch.tensor([r + [0] * (width - len(r)) for r in responses]).bool()
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    keys = [DrawKey(0, f"{i}:{side}") for side in ("chosen", "rejected") for i in indices]
    return ScoringBatch.build(ids, response, attention), keys


def micro_step(
    engines,
    tokenizer,
    indices,
    *,
    max_tokens=1 << 20,
    budget=4,
    estimator="l_over_L",
    loss_scale=1.0,
    loss_config=None,
    block_size=None,
):
    """One preference micro-step (forward and backward, no optimizer step) on PAIRS[indices]; the
    draws per block of `block_size` for a block model."""
    batch, keys = pair_batch(tokenizer, indices)
    draws = sample_draws(
        len(keys), batch.response_lengths, budget, estimator, keys=keys, block_size=block_size,
        response_starts=batch.response_starts,
    )  # fmt: skip
    result = preference_micro_step(
        engines.policy,
        as_reference(engines.reference),
        batch,
        draws,
        mask_token_id=MASK,
        loss_config=loss_config or LossConfig(beta=0.5),
        max_tokens_per_forward=max_tokens,
        max_tokens_no_grad=max_tokens,
        loss_scale=loss_scale,
    )
    return result, batch, draws
