"""Supervised fine-tuning of a masked diffusion LM on completions, one pass, chunked exactly.

LLaDA (Nie et al. 2025, eq. 5 and its SFT recipe) trains on masked response tokens only, each
cross-entropy weighted by 1/t, with the ELBO of a response

    B̂(y | x) = (1/n) Σ_k Σ_{i masked in draw k} w_k log p_θ(y_i | x, y_masked_k)

(dsdpo.objective.elbo: w_k = 1/t for one_over_t, L/l for l_over_L, the lower-variance form of the same
bound). The loss of a micro-batch of P completions is dsdpo.objective.losses.sft_losses, averaged:

    TRL's sft (default)         −Σ_p B̂(y_p) / Σ_p |y_p|       the NLL per token of the micro-batch
    LLaDA's (sft_per_response)  −(1/P) Σ_p B̂(y_p) / |y_p|     each response's NLL per token, averaged

Both are linear in the rows' log-probability sums, so each chunk of draws backprops its own part and
the sum of the chunks' gradients is exact: no first pass, no reference. Under gradient accumulation
and several ranks the step's gradient is the mean over micro-batches of each one's loss, so TRL's token
count is that of each micro-batch on each rank, as in TRL's DPOTrainer (its compute_loss ignores
num_items_in_batch). The same value is the `sft` term of dsdpo.objective.losses on a pair's chosen side.

As in LLaDA's SFT (Nie et al. 2025, appendix B), completions are padded with EOS (here to the longest
of the data set, within --max-length, so that the loss does not depend on the micro-batching; LLaDA
pads to the longest of a batch) and the EOS tokens are response tokens like any other (masked, predicted,
counted in |y|): the model learns to fill the rest of its answer canvas with EOS, which the sampler
needs (it denoises a fixed number of positions and cuts the answer at the first EOS).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from dsdpo.data.tokenize import TokenizedPair, eos_filled
from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.chunk_loop import MicroStep, backward_chunks
from dsdpo.objective.chunks import calls_per_rank, plan_chunks
from dsdpo.objective.draws import Draws
from dsdpo.objective.elbo import draw_terms
from dsdpo.objective.losses import sft_losses
from dsdpo.runtime.dist import all_reduce_max


def pad_completions_with_eos(
    pairs: list[TokenizedPair], eos_token_id: int | None, max_length: int
) -> list[TokenizedPair]:
    """The completions (chosen sides) filled with EOS to the longest of `pairs`, each row to at most
    `max_length` tokens. `pairs` is a whole data set: a completion's canvas, and so its loss, does
    not depend on the pairs it is batched with, and no row is wider than the planner counts."""
    if eos_token_id is None:
        return pairs
    longest = max(len(pair.chosen_ids) for pair in pairs)
    return [
        replace(
            pair,
            chosen_ids=eos_filled(
                pair.chosen_ids, min(longest, max_length - len(pair.prompt_ids)), eos_token_id
            ),
        )
        for pair in pairs
    ]


def sft_micro_step(
    policy,
    batch: ScoringBatch,
    draws: Draws,
    *,
    mask_token_id: int,
    max_tokens_per_forward: int,
    loss_scale: float,
    per_response: bool = False,
) -> MicroStep:
    """Backprop the SFT loss of a micro-batch of P completions (rows 0..P-1), chunk by chunk:
    TRL's NLL per token of the micro-batch, or LLaDA's mean NLL per token of each (`per_response`)."""
    responses, device = draws.batch_size, batch.input_ids.device
    lengths = batch.response_lengths.to(device)
    chunks = plan_chunks(batch, draws, max_tokens_per_forward)
    (calls,) = calls_per_rank(chunks)
    elbos = torch.zeros(responses, device=device)

    def chunk_loss(rows: Tensor, sums: Tensor) -> Tensor | None:
        part = draw_terms(sums, draws, rows).mean(1)  # this chunk's share of each B̂
        elbos.add_(part.detach())
        loss = sft_losses(part, lengths, per_response).mean()  # linear in `part`: chunks add up
        return loss * loss_scale if torch.isfinite(loss) else None  # None: the step is thrown away

    finite = backward_chunks(
        policy, batch, draws, chunks, calls, mask_token_id=mask_token_id, chunk_loss=chunk_loss
    )
    metrics = {
        "loss": float(sft_losses(elbos, lengths, per_response).mean()),
        "logps/chosen": float(elbos.mean()),
    }
    finite = all_reduce_max([0.0 if finite else 1.0]) == [0.0]
    return MicroStep(finite=finite, metrics=metrics, sweeps=2 * calls)
