"""Router statistics of a mixture-of-experts policy, for metrics.jsonl.

LLaDA-MoE's MoE blocks count the token-slots (tokens x top-k) routed to each expert
(`take_routed_tokens`, dsdpo/families/llada_moe.py), in every forward but the recomputation of a
checkpointed layer in backward. No token is ever dropped: the published router has no expert
capacity (modeling_lladamoe.py:698-710 sends every token to its top-k experts), so what can go wrong
is the balance, reported as each expert's load relative to an even share.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def take_router_counts(model: nn.Module) -> Tensor | None:
    """[MoE layers, experts] token-slots routed since the last call (None for a dense model); the
    counts restart from zero."""
    blocks = [module for module in model.modules() if hasattr(module, "take_routed_tokens")]
    return torch.stack([block.take_routed_tokens() for block in blocks]) if blocks else None


def router_metrics(counts: Tensor) -> dict[str, float]:
    """Load of an expert = its token-slots / the layer's mean over experts (1 = an even share).

    router/load_max: the busiest expert's load in any layer (at most experts / top-k);
    router/load_min: the idlest expert's load in any layer;
    router/idle_experts: experts, over all layers, that no token was routed to.
    Ratios, so a forward that runs twice (the chunked gradient's two passes) changes none of them.
    """
    counts = counts.double()
    load = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-12)
    return {
        "router/load_max": float(load.max()),
        "router/load_min": float(load.min()),
        "router/idle_experts": float((counts == 0).sum()),
    }
