"""A batch of tokenised sequences to score: prompt + response, which tokens are the response's.

Built once per micro-batch (ScoringBatch.build checks the shapes and that no response is empty);
the draws (dsdpo.objective.draws) say which response tokens each forward row masks and scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from dsdpo.errors import DsdpoError


@dataclass
class ScoringBatch:
    """Tokenised sequences (prompt + response) and which tokens are response tokens."""

    input_ids: Tensor  # [B, S]
    response_mask: Tensor  # [B, S] bool
    attention_mask: Tensor  # [B, S] long, 0 on padding

    @classmethod
    def build(cls, input_ids: Tensor, response_mask: Tensor, attention_mask: Tensor | None) -> ScoringBatch:
        response_mask = response_mask.bool()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape != response_mask.shape or input_ids.shape != attention_mask.shape:
            raise DsdpoError(
                f"input_ids {tuple(input_ids.shape)}, response_mask {tuple(response_mask.shape)} and "
                f"attention_mask {tuple(attention_mask.shape)} must have the same shape"
            )
        if bool((response_mask & (attention_mask == 0)).any()):
            raise DsdpoError("response_mask marks padding positions (attention_mask 0) as response tokens")
        empty = (response_mask.sum(1) == 0).nonzero().flatten()
        if empty.numel():
            raise DsdpoError(f"response {int(empty[0])} of the batch is empty: there is nothing to score")
        return cls(input_ids, response_mask, attention_mask)

    @cached_property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(1).cpu()

    @cached_property
    def response_positions(self) -> Tensor:
        """[B, Lmax] sequence index of each response token, padded with S (an out-of-range column)."""
        lengths = self.response_mask.sum(1)
        width = int(lengths.max())
        # A stable sort puts the response positions first, in sequence order.
        order = torch.argsort((~self.response_mask).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=order.device) < lengths[:, None]
        return torch.where(valid, order, self.input_ids.shape[1])

    @cached_property
    def response_starts(self) -> Tensor:
        """[B] the sequence position of each response's first token (where a block model's blocks
        are counted from: position 0)."""
        return self.response_positions[:, 0].cpu()

    @cached_property
    def sequence_ends(self) -> Tensor:
        """[B] one past the last attended token: columns beyond it are padding for that row."""
        columns = torch.arange(1, self.input_ids.shape[1] + 1, device=self.input_ids.device)
        return (self.attention_mask.bool() * columns).amax(1).cpu()
