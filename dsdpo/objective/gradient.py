"""The exact preference gradient of one micro-batch of pairs, with the draws split into chunks.

docs/design.md, "Exact gradients when the score is chunked". The loss ℓ is not linear in the scores, so a
chunk cannot backprop its own piece of ℓ. With B̂ = Σ_rows c_r s_r (s_r: a row's log-probability
sum, c_r = weight_r / n; see elbo.row_weights):

    ∂ℓ/∂θ = Σ_responses (∂ℓ/∂B̂) ∇B̂ = Σ_rows (∂ℓ/∂B̂_{example(r)}) c_r ∇s_r

Pass 1 computes every s_r without gradients (policy and reference), hence B̂, ℓ and g = ∂ℓ/∂B̂ by
autograd on the scores alone (so any loss in dsdpo.objective.losses works). Pass 2 recomputes the policy rows
chunk by chunk with gradients and backprops Σ_r g c_r s_r. When all rows fit in one chunk, one
forward with gradients does both. Peak activation memory is one chunk whatever the budget.

The per-draw objective (Diffusion-DPO, Wallace et al. 2024; loss.objective "per_draw") is the mean
over draws k of ℓ(f_k), with f_k the draw-k terms of the pair's four scores (policy and reference,
chosen and rejected share draw k's stratum and key). By Jensen it bounds the sequence loss from above
for a convex ℓ. Each (pair, draw) unit's loss depends on that unit's rows alone, so chunks of whole
units backprop their own losses in one pass: no first pass of the policy.

Both run their chunks through dsdpo.objective.chunk_loop, which keeps the ranks in step under ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.chunk_loop import MicroStep, backward_chunks
from dsdpo.objective.chunks import calls_per_rank, draw_units, plan_chunks, plan_unit_chunks
from dsdpo.objective.draws import Draws
from dsdpo.objective.elbo import draw_terms, forward_rows, row_weights, standard_error
from dsdpo.objective.losses import LossConfig, LossOutput, preference_loss
from dsdpo.objective.scoring import no_grad_row_sums
from dsdpo.reference.interface import Reference
from dsdpo.runtime.dist import all_reduce_max


def _per_draw_micro_step(
    policy,
    reference: Reference,
    batch: ScoringBatch,
    draws: Draws,
    *,
    mask_token_id: int,
    loss_config: LossConfig,
    max_tokens_per_forward: int,
    max_tokens_no_grad: int,
    loss_scale: float,
    preference_prob: Tensor | None,
    example_ids: Sequence[str],
    epoch: int,
) -> MicroStep:
    """The per-draw objective in one pass (module docstring): each chunk of whole (pair, draw) units
    backprops Σ_units ℓ(f_k) / (P n), so the step's gradient is that of the mean per-draw loss."""
    pairs, budget = draws.batch_size // 2, draws.budget
    grad_chunks = plan_unit_chunks(batch, draws, max_tokens_per_forward)
    (grad_calls,) = calls_per_rank(grad_chunks)
    reference_terms, sweeps = reference.terms(
        batch, draws, mask_token_id=mask_token_id, max_tokens=max_tokens_no_grad, example_ids=example_ids,
        epoch=epoch,
    )  # fmt: skip
    device = batch.input_ids.device
    lengths = batch.response_lengths.to(device)
    unit = draw_units(draws).to(device)
    policy_terms = torch.zeros(2 * pairs, budget, device=device)
    unit_losses = torch.zeros(pairs * budget, device=device)

    def units_loss(rows: Tensor, sums: Tensor) -> Tensor | None:
        terms = draw_terms(sums, draws, rows)  # [2P, n], zero outside the chunk's units
        units = unit[rows.to(device)].unique()
        p, k = units // budget, units % budget
        out = preference_loss(
            terms[p, k],
            terms[p + pairs, k],
            reference_terms[p, k] if reference_terms is not None else None,
            reference_terms[p + pairs, k] if reference_terms is not None else None,
            loss_config,
            preference_prob[p] if preference_prob is not None else None,
            chosen_lengths=lengths[p],
            rejected_lengths=lengths[p + pairs],
        )
        unit_losses[units] = out.losses.detach()
        policy_terms.add_(terms.detach())
        if not bool(torch.isfinite(out.losses).all()):
            return None
        return out.losses.sum() / (pairs * budget) * loss_scale

    finite = backward_chunks(
        policy, batch, draws, grad_chunks, grad_calls, mask_token_id=mask_token_id, chunk_loss=units_loss
    )
    sweeps += 2 * grad_calls
    # Metrics of the sequence scores (rewards, log-probabilities); the loss is the per-draw one.
    scores = policy_terms.mean(1)
    reference_scores = reference_terms.mean(1) if reference_terms is not None else None
    sequence = preference_loss(
        scores[:pairs],
        scores[pairs:],
        reference_scores[:pairs] if reference_scores is not None else None,
        reference_scores[pairs:] if reference_scores is not None else None,
        loss_config,
        preference_prob,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
    )
    metrics = {
        **sequence.metrics(scores[:pairs], scores[pairs:]),
        "loss": float(unit_losses.mean()),
        **_diagnostics(policy_terms, reference_terms),
    }
    finite = all_reduce_max([0.0 if finite else 1.0]) == [0.0]  # finite on every rank
    return MicroStep(finite=finite, metrics=metrics, sweeps=sweeps)


def _diagnostics(policy_terms: Tensor, reference_terms: Tensor | None) -> dict[str, float]:
    """VRPO diagnostics: std error of B̂_θ, of B̂_θ − B̂_ref (antithetic), and their draw correlation."""
    if policy_terms.shape[1] < 2:  # one draw: no spread to measure
        return {}
    score_stderr = {"vrpo/score_stderr": float(standard_error(policy_terms).mean())}
    if reference_terms is None:
        return score_stderr
    difference = policy_terms - reference_terms
    centred_p = policy_terms - policy_terms.mean(1, keepdim=True)
    centred_r = reference_terms - reference_terms.mean(1, keepdim=True)
    covariance = (centred_p * centred_r).sum(1)
    norms = (centred_p.square().sum(1) * centred_r.square().sum(1)).sqrt().clamp_min(1e-12)
    return {
        **score_stderr,
        "vrpo/diff_stderr": float(standard_error(difference).mean()),
        "vrpo/policy_ref_corr": float((covariance / norms).mean()),
    }


def preference_micro_step(
    policy,
    reference: Reference,
    batch: ScoringBatch,
    draws: Draws,
    *,
    mask_token_id: int,
    loss_config: LossConfig,
    max_tokens_per_forward: int,
    max_tokens_no_grad: int,
    loss_scale: float,
    preference_prob: Tensor | None = None,
    reference_draws: Draws | None = None,
    example_ids: Sequence[str] = (),
    epoch: int = 0,
) -> MicroStep:
    """Score a micro-batch of P pairs (rows 0..P-1 chosen, P..2P-1 rejected) and backprop its loss.

    `reference` gives the per-draw reference terms (dsdpo.reference.interface: an engine, the adapter-off
    policy, precomputed terms of `example_ids` at `epoch`, or none). It scores `draws` too
    (antithetic, the default), or its own `reference_draws` (an ablation of VRPO: no shared noise).

    `loss_scale` multiplies the micro-batch's mean loss (1 / gradient accumulation steps), so that the
    step's gradient is that of the mean loss over every pair of the step.
    """
    if loss_config.objective == "per_draw":
        return _per_draw_micro_step(
            policy,
            reference,
            batch,
            draws,
            mask_token_id=mask_token_id,
            loss_config=loss_config,
            max_tokens_per_forward=max_tokens_per_forward,
            max_tokens_no_grad=max_tokens_no_grad,
            loss_scale=loss_scale,
            preference_prob=preference_prob,
            example_ids=example_ids,
            epoch=epoch,
        )
    pairs = batch.input_ids.shape[0] // 2
    reference_draws = reference_draws or draws
    grad_chunks = plan_chunks(batch, draws, max_tokens_per_forward)
    no_grad_chunks = plan_chunks(batch, draws, max_tokens_no_grad)
    grad_calls, no_grad_calls = calls_per_rank(grad_chunks, no_grad_chunks)
    single_pass = grad_calls == 1
    coefficients = row_weights(draws).to(batch.input_ids.device)

    reference_terms, sweeps = reference.terms(
        batch, reference_draws, mask_token_id=mask_token_id, max_tokens=max_tokens_no_grad,
        example_ids=example_ids, epoch=epoch,
    )  # fmt: skip
    if single_pass:
        policy_sums = policy(**forward_rows(batch, draws, grad_chunks[0], mask_token_id))
    else:
        policy_sums = no_grad_row_sums(policy, batch, draws, mask_token_id, no_grad_chunks, no_grad_calls)
    sweeps += 1 if single_pass else no_grad_calls

    policy_terms = draw_terms(policy_sums, draws)
    scores = policy_terms.mean(1) if single_pass else policy_terms.mean(1).requires_grad_()
    reference_scores = reference_terms.mean(1) if reference_terms is not None else None
    out: LossOutput = preference_loss(
        scores[:pairs],
        scores[pairs:],
        reference_scores[:pairs] if reference_scores is not None else None,
        reference_scores[pairs:] if reference_scores is not None else None,
        loss_config,
        preference_prob,
        chosen_lengths=batch.response_lengths[:pairs].to(scores.device),
        rejected_lengths=batch.response_lengths[pairs:].to(scores.device),
    )
    metrics = {
        **out.metrics(scores[:pairs], scores[pairs:]),
        **_diagnostics(policy_terms.detach(), reference_terms),
    }
    # A non-finite loss on any rank skips this micro-batch everywhere (the ranks stay in lockstep).
    finite = all_reduce_max([0.0 if bool(torch.isfinite(out.losses).all()) else 1.0]) == [0.0]
    if not finite:
        return MicroStep(finite=False, metrics=metrics, sweeps=sweeps)

    if single_pass:
        policy.backward(out.loss * loss_scale, scale_wrt_gas=False)
        return MicroStep(finite=True, metrics=metrics, sweeps=sweeps + 1)

    # g = ∂(scaled loss)/∂B̂ per response, spread onto rows: ∂/∂s_r = g[example(r)] · c_r.
    (out.loss * loss_scale).backward()
    row_grads = scores.grad[draws.example.to(scores.device)] * coefficients
    backward_chunks(
        policy, batch, draws, grad_chunks, grad_calls, mask_token_id=mask_token_id,
        chunk_loss=lambda rows, sums: (sums * row_grads[rows.to(row_grads.device)]).sum(),
    )  # fmt: skip
    return MicroStep(finite=True, metrics=metrics, sweeps=sweeps + 2 * grad_calls)
