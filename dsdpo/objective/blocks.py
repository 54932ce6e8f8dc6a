"""Block diffusion: how a block model's rows are laid out for scoring.

docs/design.md, "The block-diffusion ELBO". A block model (SDAR, LLaDA 2.x) denoises a sequence block
by block, blocks counted from position 0 of prompt + response (generate.py:79-81; LLaDA 2.x's
generate(), modeling_llada2_moe.py:1335-1357): block b is predicted from
the clean blocks before it, bidirectionally inside itself, and never sees a later block. Its score
is a sum over blocks, each block's bound computed with every earlier block clean, so one row of
masks in several blocks cannot go through the model as one sequence (block b would see block b-1's
masks). The family's own training puts the noised and the clean copy side by side instead
(modeling_sdar.py block_diff_mask 286-327; dFactory's block_diffusion_mask, train_llada2_bd.py
122-166): the noised copy of block b attends to itself and to the clean copy of blocks < b, the
clean copy is block-causal, so one forward of twice the length scores every block at once.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def response_segments(start: int, length: int, block_size: int | None) -> list[tuple[int, int]]:
    """[(first, end)) runs of response-relative indices that share a block, for a response whose
    first token sits at sequence position `start`; the whole response when there are no blocks."""
    if block_size is None:
        return [(0, length)]
    cuts = [0, *range(-start % block_size or block_size, length, block_size), length]
    return [(first, end) for first, end in itertools.pairwise(cuts) if end > first]


def block_causal_mask(positions: Tensor, attention_mask: Tensor | None, block_size: int) -> Tensor:
    """[B, 1, S, S] boolean (True = attend): query i sees key j iff j's block is not after i's and j is
    not padding; blocks are position // block_size, from position 0 (SDAR's generate.py:79-87,
    LLaDA 2.x's generate(), modeling_llada2_moe.py:1335-1347)."""
    blocks = positions // block_size
    mask = blocks[:, None, :, None] >= blocks[:, None, None, :]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask


def block_diffusion_mask(attention_mask: Tensor, block_size: int) -> Tensor:
    """[B, 1, 2S, 2S] boolean (True = attend) over [noised ; clean] rows of S positions each:
    noised block b sees noised block b and clean blocks < b; clean block b sees clean blocks <= b;
    padded keys (attention_mask 0) are hidden from every query (block_diff_mask, see above)."""
    width = attention_mask.shape[1]
    block = torch.arange(width, device=attention_mask.device) // block_size
    query, key = block[:, None], block[None, :]
    noised = torch.cat([query == key, query > key], dim=1)
    clean = torch.cat([torch.zeros_like(query == key), query >= key], dim=1)
    keys = attention_mask.bool().repeat(1, 2)
    return torch.cat([noised, clean], dim=0)[None, None] & keys[:, None, None, :]


def block_diffusion_inputs(noised: Tensor, clean: Tensor, attention_mask: Tensor, block_size: int) -> dict:
    """The model inputs of rows [noised ; clean]: ids, the positions of each copy (0..S-1 twice, so
    that both copies of a token share its rotary position) and the block-diffusion mask."""
    positions = torch.arange(noised.shape[1], device=noised.device).expand(noised.shape[0], -1)
    return {
        "input_ids": torch.cat([noised, clean], dim=1),
        "position_ids": positions.repeat(1, 2),
        "attention_mask": block_diffusion_mask(attention_mask, block_size),
    }
