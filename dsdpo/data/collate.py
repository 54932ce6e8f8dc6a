"""Padding a list of pairs into one tensor batch: chosen sequences first, then rejected ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsdpo.data.tokenize import TokenizedPair


@dataclass
class PairBatch:
    # [2P, S] long: rows 0..P-1 prompt+chosen, rows P..2P-1 prompt+rejected (absent for SFT), right-padded
    input_ids: Tensor
    attention_mask: Tensor  # [2P, S] long, 0 on padding
    response_mask: Tensor  # [2P, S] bool, True exactly on response tokens
    example_ids: list[str]  # P ids
    preference_prob: Tensor | None  # [P] float, or None when no pair has a soft label

    @property
    def num_pairs(self) -> int:
        return len(self.example_ids)


def preference_probs(pairs: list[TokenizedPair]) -> Tensor | None:
    """Soft labels; a pair without one counts as a hard preference for chosen (probability 1)."""
    if all(pair.preference_prob is None for pair in pairs):
        return None
    return torch.tensor([1.0 if p.preference_prob is None else p.preference_prob for p in pairs])


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, *, chosen_only: bool = False) -> PairBatch:
    """Rows prompt+chosen then prompt+rejected; with chosen_only (SFT) the first P rows alone."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if not chosen_only:
        sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :end] = 1
        response_mask[row, len(prompt) : end] = True
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        example_ids=[p.example_id for p in pairs],
        preference_prob=preference_probs(pairs),
    )
