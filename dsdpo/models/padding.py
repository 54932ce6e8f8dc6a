"""Models that ignore the padding mask: found by a probe, then run without padding.

dsdpo pads the rows of a forward to the widest. A model whose code ignores `attention_mask` (LLaDA's
published code before its 2025-10 update, and other remote code) then lets real tokens attend to
padding, and a response scores differently alone and in a batch. Such a model is found once by a
probe (the same tokens with and without appended padding must give the same logits) and is then
run on rows of equal length only, so no row ever holds padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PROBE_LENGTH, PROBE_PADDING = 8, 4
PROBE_TOLERANCE = 1e-3  # logits change by O(1) when padding is attended to; rounding is far below


@torch.no_grad()
def ignores_padding(logits_of: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor) -> bool:
    """Whether padding changes the logits of the real tokens: run the first tokens of `input_ids`'s
    first row alone, then with padding appended and masked out, and compare."""
    tokens = input_ids[:1, :PROBE_LENGTH]
    padded = torch.cat([tokens, tokens[:, :1].expand(1, PROBE_PADDING)], dim=1)
    mask = torch.ones_like(padded)
    mask[:, tokens.shape[1] :] = 0
    alone = logits_of(tokens, torch.ones_like(tokens)).float()
    with_padding = logits_of(padded, mask)[:, : tokens.shape[1]].float()
    return bool((alone - with_padding).abs().max() > PROBE_TOLERANCE * (1 + alone.abs().max()))


def distinct_lengths(attention_mask: Tensor) -> int:
    """How many forwards logits_without_padding runs for these rows."""
    return int(attention_mask.bool().sum(1).unique().numel())


def logits_without_padding(
    logits_of: Callable[[Tensor, Tensor], Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    forwards: int = 0,
) -> Tensor:
    """[B, S, V] logits with every row run on its real tokens only, rows of equal length together.

    Works for left and right padding (the real tokens of a row are where its mask is 1); padded
    positions get zeros, never read. `forwards`: run at least this many forwards, the extra ones on
    the first row's first token, their logits joined to the output times zero (so that backward
    passes through them too): under ZeRO-3 every forward gathers parameters collectively, so every
    rank must run as many as the rank with the most distinct row lengths.
    """
    real = attention_mask.bool()
    lengths = real.sum(1)
    out = None
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero(as_tuple=True)[0]
        tokens = input_ids[rows][real[rows]].view(len(rows), length)
        logits = logits_of(tokens, torch.ones_like(tokens))
        if out is None:
            out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[rows.unsqueeze(1), real[rows].nonzero(as_tuple=True)[1].view(len(rows), length)] = logits
    for _ in range(forwards - distinct_lengths(attention_mask)):
        filler = input_ids[:1, :1]
        out[0, 0] = out[0, 0] + 0 * logits_of(filler, torch.ones_like(filler))[0, 0]
    return out
