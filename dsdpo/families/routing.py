"""Routed experts, and the router statistics of a mixture-of-experts policy for metrics.jsonl.

LLaDA-MoE's and LLaDA 2.x's MoE blocks (RoutedExperts, each family's router in `route`) count the
token-slots (tokens x top-k) routed to each expert (`take_routed_tokens`), in every forward but the
recomputation of a checkpointed layer in backward. No token is ever dropped: neither published
router has an expert capacity (modeling_lladamoe.py:698-710, modeling_llada2_moe.py:345-375 send
every token to its top-k experts), so what can go wrong is the balance, reported as each expert's
load relative to an even share.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RoutedExperts(nn.Module):
    """`experts` (a list of modules) and the router a subclass implements in `route`.

    Every expert runs in every forward, in index order, with the tokens routed to it (possibly
    none), as LLaDA-MoE's published loop does (modeling_lladamoe.py:698-710): under ZeRO-3 each
    expert is gathered as a module when it runs, every rank gathers the same experts in the same
    order (the gathers are collective), and the prefetch trace does not change with the routing.
    The weighted outputs are summed in `sum_dtype` (None: the activations' dtype) and rounded to
    the activations' dtype once.
    """

    sum_dtype: torch.dtype | None = None

    def __init__(self, experts: list[nn.Module], top_k: int):
        super().__init__()
        self.top_k = top_k
        self.experts = nn.ModuleList(experts)
        # Token-slots routed to each expert since the last take_routed_tokens: a plain attribute,
        # not a buffer, which from_pretrained would leave uninitialised.
        self.routed_tokens: Tensor | None = None

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, experts) [N, top_k] of the tokens [N, D]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        tokens = x.reshape(-1, width)
        weights, experts = self.route(tokens)
        out = torch.zeros_like(tokens, dtype=self.sum_dtype or x.dtype)
        weights = weights.to(out.dtype)
        if torch._C._current_graph_task_id() == -1:  # not a checkpointed recomputation in backward
            counts = torch.bincount(experts.flatten(), minlength=len(self.experts))
            self.routed_tokens = counts if self.routed_tokens is None else self.routed_tokens + counts
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(experts == index)
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.to(x.dtype).reshape(batch, length, width)

    def take_routed_tokens(self) -> Tensor:
        """[experts] token-slots routed to each since the last call; the count restarts."""
        counts = self.routed_tokens if self.routed_tokens is not None else torch.zeros(len(self.experts))
        self.routed_tokens = None
        return counts.long().cpu()


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
