"""The one loop of forward and backward calls over a micro-batch's chunks, in step on every rank.

docs/design.md, "Exact gradients when the score is chunked" and "The per-draw objective". Each
chunk's rows (dsdpo.objective.chunks) go through the policy with gradients, and the chunk's loss is
backpropagated at once, so peak activation memory is one chunk. What that loss is, the caller says:

    pass 2 of the sequence objective   Σ_r g c_r s_r, g = ∂ℓ/∂B̂ from pass 1 (dsdpo.objective.gradient)
    the per-draw objective             Σ_units ℓ(f_k) / (P n) of the chunk's whole (pair, draw) units
    SFT                                the chunk's share of the SFT loss, linear in the rows' sums

Each is a sum over the chunk's rows, so the chunks' gradients add up to the step's.

Under ZeRO-3 every forward and backward gathers the parameters collectively, so every rank makes the
same number of calls (chunks.calls_per_rank): a rank with fewer chunks repeats its first one with a
zero coefficient (a filler), which adds nothing to the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.chunks import padded_calls
from dsdpo.objective.draws import Draws
from dsdpo.objective.elbo import forward_rows


@dataclass
class MicroStep:
    """What one micro-batch did: its loss (None when non-finite and skipped) and diagnostics."""

    finite: bool
    metrics: dict[str, float] = field(default_factory=dict)
    sweeps: int = 0  # parameter sweeps: forward and backward calls of the policy and the reference


def backward_chunks(
    policy,
    batch: ScoringBatch,
    draws: Draws,
    chunks: list[Tensor],
    calls: int,
    *,
    mask_token_id: int,
    chunk_loss: Callable[[Tensor, Tensor], Tensor | None],
) -> bool:
    """Forward and backward each chunk of rows, then fillers up to `calls` (module docstring);
    whether every chunk's loss was finite.

    chunk_loss(rows, sums) is the loss to backprop for the chunk `rows`, from their log-probability
    sums (`sums`, with gradients), scaled as the step needs; or None when it is not finite: the chunk
    then backprops zero, like a filler, and the step is to be thrown away (dsdpo/training).
    """
    finite = True
    for rows, real in padded_calls(chunks, calls):
        sums = policy(**forward_rows(batch, draws, rows, mask_token_id))
        loss = chunk_loss(rows, sums) if real else None
        finite = finite and (loss is not None or not real)
        policy.backward((sums * 0).sum() if loss is None else loss, scale_wrt_gas=False)
    return finite
