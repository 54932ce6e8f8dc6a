"""Monte Carlo ELBO scores of responses under a masked diffusion LM.

docs/design.md, "The score of a response".

    terms = elbo_terms(model, input_ids, response_mask, mask_token_id=m, draws=d)   # [B, n]
    scores = elbo(model, input_ids, response_mask, mask_token_id=m, budget=8)      # [B]

`model` is a plain transformers model (or any module whose forward(input_ids, attention_mask)
returns logits or an output with `.logits`), a MaskedTokenScorer, or a DeepSpeed engine around one.
Only response tokens are ever masked; the prompt is always visible; padding never counts.
The rows of all draws go through the model in as few forward calls as `max_tokens_per_forward`
allows (rows × sequence length per call, dsdpo.objective.chunks), never one forward per draw. A
block model's rows go as [noised ; clean] (dsdpo.objective.blocks), twice the length: every block is
scored in the same forward. The batch itself is dsdpo.objective.batch.ScoringBatch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dsdpo.errors import DsdpoError
from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.blocks import block_diffusion_inputs, response_segments
from dsdpo.objective.chunks import plan_chunks
from dsdpo.objective.draws import DrawKey, Draws, sample_draws
from dsdpo.objective.logprobs import as_scorer


def _scatter_to_sequence(relative: Tensor, positions: Tensor, width: int) -> Tensor:
    """Response-relative columns -> sequence columns (the padded index S lands in a dropped column)."""
    out = torch.zeros(relative.shape[0], width + 1, dtype=relative.dtype, device=positions.device)
    out.scatter_(1, positions[:, : relative.shape[1]], relative.to(positions.device))
    return out[:, :width]


def forward_rows(batch: ScoringBatch, draws: Draws, rows: Tensor, mask_token_id: int) -> dict[str, Tensor]:
    """The model inputs of some rows of `draws`: masked input ids, attention, scored positions, targets.

    Block draws: [noised ; clean] ids, their positions and the block-diffusion mask (dsdpo.objective.blocks);
    `scored` and `targets` cover the noised copy only (the first S columns): the clean copy is context.
    """
    device = batch.input_ids.device
    rows = rows.to(draws.example.device)
    example = draws.example[rows].to(device)
    width = int(batch.sequence_ends[draws.example[rows]].max())
    positions = batch.response_positions[example]
    masked = _scatter_to_sequence(draws.masked[rows], positions, batch.input_ids.shape[1])[:, :width]
    scored = _scatter_to_sequence(draws.scored[rows], positions, batch.input_ids.shape[1])[:, :width]
    targets = batch.input_ids[example, :width]
    noised, attention = targets.masked_fill(masked, mask_token_id), batch.attention_mask[example, :width]
    inputs = {"input_ids": noised, "attention_mask": attention}
    if draws.block_size is not None:
        inputs = block_diffusion_inputs(noised, targets, attention, draws.block_size)
    return {**inputs, "scored": scored, "targets": targets}


def row_weights(draws: Draws) -> Tensor:
    """[R] the coefficient of each row's log-probability sum in its response's score B̂ = mean_k f_k."""
    return (draws.weight / draws.budget).float()


def draw_terms(row_sums: Tensor, draws: Draws, rows: Tensor | None = None) -> Tensor:
    """[B, n] per-draw terms f_k = Σ_rows weight · (row log-probability sum).

    With `rows`, `row_sums` are those rows' sums only, and the terms they do not reach are zero.
    """
    rows = torch.arange(draws.num_rows) if rows is None else rows.to(draws.example.device)
    flat_index = (draws.example[rows] * draws.budget + draws.draw[rows]).to(row_sums.device)
    terms = torch.zeros(draws.batch_size * draws.budget, dtype=row_sums.dtype, device=row_sums.device)
    terms = terms.index_add(0, flat_index, row_sums * draws.weight[rows].to(row_sums))
    return terms.view(draws.batch_size, draws.budget)


def _block_size(model: nn.Module) -> int | None:
    """The block length of a block model (its scorer knows), None for any other."""
    scorer = as_scorer(model)
    return getattr(scorer, "module", scorer).block_size


def row_logprob_sums(
    model: nn.Module, batch: ScoringBatch, draws: Draws, *, mask_token_id: int, max_tokens_per_forward=None
) -> Tensor:
    """[R] Σ log p(y_i | x, y with the row's mask) over each row's scored positions."""
    if not torch.equal(draws.lengths, batch.response_lengths):
        raise DsdpoError(
            f"the draws were made for response lengths {draws.lengths.tolist()}, "
            f"but the batch has {batch.response_lengths.tolist()}"
        )
    if draws.block_size != _block_size(model):
        raise DsdpoError(
            f"the draws were made for block size {draws.block_size}, but the model's is {_block_size(model)} "
            "(None: not a block model)"
        )
    scorer = as_scorer(model)
    chunks = plan_chunks(batch, draws, max_tokens_per_forward)
    return torch.cat([scorer(**forward_rows(batch, draws, rows, mask_token_id)) for rows in chunks])


def elbo_terms(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    mask_token_id: int,
    draws: Draws,
    attention_mask: Tensor | None = None,
    max_tokens_per_forward: int | None = None,
) -> Tensor:
    """[B, n] the per-draw ELBO terms f_k of each response (their mean over k is the score)."""
    batch = ScoringBatch.build(input_ids, response_mask, attention_mask)
    sums = row_logprob_sums(
        model, batch, draws, mask_token_id=mask_token_id, max_tokens_per_forward=max_tokens_per_forward
    )
    return draw_terms(sums, draws)


def elbo(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    mask_token_id: int,
    budget: int = 8,
    estimator: str = "l_over_L",
    draws: Draws | None = None,
    seed: int = 0,
    keys: Sequence[DrawKey] | None = None,
    steps: int | None = None,
    attention_mask: Tensor | None = None,
    max_tokens_per_forward: int | None = None,
) -> Tensor:
    """[B] Monte Carlo estimate of each response's ELBO B_θ(y|x) with `budget` keyed draws.

    Give `draws` to score exact, shared masks (policy and reference); otherwise they are sampled
    from `keys` (default: seed `seed`, example id = batch index, epoch 0), per block for a block model.
    """
    if draws is None:
        if keys is None:
            keys = [DrawKey(seed, index) for index in range(input_ids.shape[0])]
        batch = ScoringBatch.build(input_ids, response_mask, attention_mask)
        draws = sample_draws(
            input_ids.shape[0], batch.response_lengths, budget, estimator, keys=keys, steps=steps,
            block_size=_block_size(model), response_starts=batch.response_starts,
        )  # fmt: skip
    terms = elbo_terms(
        model,
        input_ids,
        response_mask,
        mask_token_id=mask_token_id,
        draws=draws,
        attention_mask=attention_mask,
        max_tokens_per_forward=max_tokens_per_forward,
    )
    return terms.mean(-1)


def standard_error(terms: Tensor) -> Tensor:
    """[...] std of the last axis (n−1) / sqrt(n): the standard error of its mean (of B̂ for per-draw
    terms); NaN when n = 1."""
    n = terms.shape[-1]
    if n < 2:
        return torch.full(terms.shape[:-1], math.nan, dtype=terms.dtype)
    return terms.std(-1, correction=1) / math.sqrt(n)


def enumeration_draws(
    response_lengths: Sequence[int],
    block_size: int | None = None,
    response_starts: Sequence[int] | None = None,
) -> Draws:
    """Every non-empty mask set M of every response as one row, weighted 1/(|M| · C(L, |M|)); for a
    block model, of every block's L_b response tokens, weighted 1/(|M| · C(L_b, |M|)).

    Summed, these rows give the ELBO exactly (docs/design.md, "Exact value for small L" and "The
    block-diffusion ELBO"): 2^L - 1 rows a response (a block), so only for short ones.
    """
    lengths = torch.as_tensor(list(response_lengths), dtype=torch.long)
    starts = [0] * len(lengths) if response_starts is None else list(response_starts)
    width = int(lengths.max())
    example, masked, weight = [], [], []
    for b, (length, start) in enumerate(zip(lengths.tolist(), starts, strict=True)):
        for first, end in response_segments(start, length, block_size):
            if end - first > 16:
                raise DsdpoError(
                    f"exact ELBO enumerates 2^L mask sets; L={end - first} is too long (at most 16)"
                )
            for size in range(1, end - first + 1):
                for subset in itertools.combinations(range(first, end), size):
                    row = torch.zeros(width, dtype=torch.bool)
                    row[list(subset)] = True
                    example.append(b)
                    masked.append(row)
                    weight.append(1.0 / (size * math.comb(end - first, size)))
    mask_rows = torch.stack(masked)
    return Draws(
        example=torch.tensor(example),
        draw=torch.zeros(len(example), dtype=torch.long),
        masked=mask_rows,
        scored=mask_rows,
        weight=torch.tensor(weight, dtype=torch.float64),
        lengths=lengths,
        budget=1,
        block_size=block_size,
    )


@torch.no_grad()
def exact_elbo(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    mask_token_id: int,
    attention_mask: Tensor | None = None,
    max_tokens_per_forward: int | None = 65536,
) -> Tensor:
    """[B] the ELBO by enumerating every mask set (of every block, for a block model): the number
    Monte Carlo estimates must converge to."""
    batch = ScoringBatch.build(input_ids, response_mask, attention_mask)
    draws = enumeration_draws(  # one "draw": the exact sum
        batch.response_lengths.tolist(), _block_size(model), batch.response_starts.tolist()
    )
    return elbo(
        model,
        input_ids,
        response_mask,
        mask_token_id=mask_token_id,
        draws=draws,
        attention_mask=attention_mask,
        max_tokens_per_forward=max_tokens_per_forward,
    )
