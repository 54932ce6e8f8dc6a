"""The chunked two-pass gradient equals the unchunked one, through real ZeRO-3 engines on the CPU."""

from dataclasses import replace

import pytest
import torch

from dsdpo.objective.elbo import elbo_terms
from dsdpo.objective.losses import LossConfig
from tests.ds_helpers import MASK, cpu_ds_config, engines_for, full_weights, micro_step


def _train_one_step(
    model_dir,
    tokenizer,
    micro_batches,
    *,
    max_tokens,
    budget=4,
    estimator="l_over_L",
    loss_config=None,
    head_slice_positions=None,
):
    engines = engines_for(
        model_dir, cpu_ds_config(micro=len(micro_batches[0]), accumulation=len(micro_batches))
    )
    if head_slice_positions is not None:  # the scorers' output layer a few positions at a time
        for engine in (engines.policy, engines.reference):
            engine.module.head_slice_bytes = 4 * tokenizer.vocab_size * head_slice_positions
    before = full_weights(engines.policy)
    results = []
    for indices in micro_batches:
        results.append(
            micro_step(
                engines,
                tokenizer,
                indices,
                max_tokens=max_tokens,
                budget=budget,
                estimator=estimator,
                loss_scale=1 / len(micro_batches),
                loss_config=loss_config,
            )[0]
        )
    engines.policy.step()
    after = full_weights(engines.policy)
    reference = full_weights(engines.reference)
    return before, after, reference, results


@pytest.fixture(scope="module")
def unchunked(tiny_gemma_dir, tokenizer):
    return _train_one_step(tiny_gemma_dir, tokenizer, [[0, 1, 2, 3]], max_tokens=1 << 20)


def _assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_smallest_chunking_gives_the_unchunked_step(tiny_gemma_dir, tokenizer, unchunked):
    before, after_whole, _, whole = unchunked
    assert whole[0].sweeps == 3  # one reference forward, one policy forward and its backward
    _, after_chunked, _, chunked = _train_one_step(tiny_gemma_dir, tokenizer, [[0, 1, 2, 3]], max_tokens=1)
    assert chunked[0].sweeps > 30  # one row per forward: 32 rows, two passes
    assert chunked[0].metrics["loss"] == pytest.approx(whole[0].metrics["loss"], abs=1e-6)
    moved = max(float((after_whole[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the step did something, so equality below is not trivial
    _assert_same_weights(after_chunked, after_whole)


def test_the_output_layer_in_slices_gives_the_same_step_under_zero3(tiny_gemma_dir, tokenizer, unchunked):
    """ZeRO-3 gathers the output layer's weight at each slice's call, and again for its recompute."""
    _, after_whole, _, whole = unchunked
    _, after_sliced, _, sliced = _train_one_step(
        tiny_gemma_dir, tokenizer, [[0, 1, 2, 3]], max_tokens=1 << 20, head_slice_positions=3
    )
    assert sliced[0].metrics["loss"] == pytest.approx(whole[0].metrics["loss"], abs=1e-6)
    _assert_same_weights(after_sliced, after_whole)


def test_batch_level_and_per_token_losses_chunk_exactly(tiny_gemma_dir, tokenizer):
    """AOT sorts over the micro-batch, bco_pair_batch averages its rewards, TRL's sft term divides by
    its token count; sigmoid_norm and WPO read response lengths (WPO's weights do not apply to AOT)."""
    loss = LossConfig("aot_unpaired,sigmoid_norm", beta=0.5, weights="1,0.5", sft_weight=0.1)
    weighted = LossConfig("bco_pair_batch,ipo", beta=0.5, weights="1,0.5", wpo_unaligned=True, sft_weight=0.1)
    for config in (loss, weighted):
        runs = [
            _train_one_step(tiny_gemma_dir, tokenizer, [[0, 1, 2, 3]], max_tokens=m, loss_config=config)
            for m in (1 << 20, 1)
        ]
        (before, after_whole, _, whole), (_, after_chunked, _, chunked) = runs
        assert chunked[0].sweeps > whole[0].sweeps
        assert max(float((after_whole[k] - before[k]).abs().max()) for k in before) > 1e-3
        _assert_same_weights(after_chunked, after_whole)


def test_micro_batch_one_times_four_equals_micro_batch_four(tiny_gemma_dir, tokenizer, unchunked):
    _, after_whole, _, _ = unchunked
    _, after_accumulated, _, _ = _train_one_step(
        tiny_gemma_dir, tokenizer, [[0], [1], [2], [3]], max_tokens=24
    )
    _assert_same_weights(after_accumulated, after_whole)


def test_reference_weights_do_not_move(unchunked):
    before, _, reference, _ = unchunked
    _assert_same_weights(reference, before, atol=0)


def test_a_non_finite_loss_is_reported_and_never_backpropagated(tiny_gemma_dir, tokenizer):
    engines = engines_for(tiny_gemma_dir, cpu_ds_config())
    # The reference returns NaN scores: the loss is NaN; no backward may run.
    hook = engines.reference.module.register_forward_hook(lambda _m, _i, out: out * float("nan"))
    calls = []
    engines.policy.module.register_full_backward_hook(lambda *_: calls.append(1))
    try:
        result, _, _ = micro_step(engines, tokenizer, [0], budget=2)
    finally:
        hook.remove()
    assert not result.finite
    assert calls == []


PER_DRAW = LossConfig(beta=0.5, objective="per_draw")


@pytest.fixture(scope="module")
def reference_terms():
    """Precomputed reference terms [2P, n] unlike the policy's, so each (pair, draw) has its own
    coefficient (at step 1 an engine reference equals the policy and every coefficient is σ(0))."""
    return -20 + 5 * torch.rand(8, 4, generator=torch.Generator().manual_seed(0))


def _per_draw_step(model_dir, tokenizer, reference, max_tokens):
    engines = engines_for(model_dir, cpu_ds_config(micro=4))
    before = full_weights(engines.policy)
    result, batch, draws = micro_step(
        replace(engines, reference=reference),
        tokenizer,
        [0, 1, 2, 3],
        max_tokens=max_tokens,
        loss_config=PER_DRAW,
    )
    engines.policy.step()
    return before, full_weights(engines.policy), result, batch, draws


def test_per_draw_objective_is_the_mean_of_per_draw_losses(tiny_gemma_dir, tokenizer, reference_terms):
    """Checked against per-draw terms computed independently (elbo_terms on the plain model)."""
    from dsdpo.models.loading import load_model

    plain = load_model(tiny_gemma_dir).eval()
    _, _, result, batch, draws = _per_draw_step(tiny_gemma_dir, tokenizer, reference_terms, 1 << 20)
    with torch.no_grad():
        f = elbo_terms(
            plain,
            batch.input_ids,
            batch.response_mask,
            mask_token_id=MASK,
            draws=draws,
            attention_mask=batch.attention_mask,
        )
    h = (f[:4] - reference_terms[:4]) - (f[4:] - reference_terms[4:])  # [P, n], draw by draw
    per_draw = torch.nn.functional.softplus(-0.5 * h).mean()
    sequence = torch.nn.functional.softplus(-0.5 * h.mean(1)).mean()
    assert result.metrics["loss"] == pytest.approx(float(per_draw), abs=1e-5)
    assert float(per_draw) > float(sequence)  # Jensen: the per-draw loss bounds the sequence loss
    assert result.sweeps == 2  # one forward and one backward: no first pass, no reference engine


def test_per_draw_chunked_equals_unchunked(tiny_gemma_dir, tokenizer, reference_terms):
    before, whole, _, _, _ = _per_draw_step(tiny_gemma_dir, tokenizer, reference_terms, 1 << 20)
    _, chunked, result, _, _ = _per_draw_step(tiny_gemma_dir, tokenizer, reference_terms, 1)
    assert result.sweeps == 2 * 16  # one (pair, draw) unit per chunk: 4 pairs × 4 draws
    assert max(float((whole[k] - before[k]).abs().max()) for k in before) > 1e-3
    _assert_same_weights(chunked, whole)


def test_per_draw_equals_sequence_for_a_loss_linear_in_h(tiny_gemma_dir, tokenizer, reference_terms):
    """hinge with βh < 1 is 1 − βh: linear, so mean_k ℓ(h_k) = ℓ(mean_k h_k), gradients included."""
    after = {}
    for objective in ("sequence", "per_draw"):
        engines = engines_for(tiny_gemma_dir, cpu_ds_config(micro=4))
        loss = LossConfig("hinge", beta=0.01, objective=objective)
        result, _, _ = micro_step(
            replace(engines, reference=reference_terms), tokenizer, [0, 1, 2, 3], loss_config=loss
        )
        engines.policy.step()
        after[objective] = full_weights(engines.policy)
        assert 0 < result.metrics["loss"] < 1  # inside the linear region
    _assert_same_weights(after["per_draw"], after["sequence"])


def _independent_reference_step(model_dir, tokenizer, max_tokens):
    """One step where the reference engine scores its own draws (score.antithetic false)."""
    from dsdpo.objective.draws import DrawKey, sample_draws
    from dsdpo.objective.gradient import preference_micro_step
    from dsdpo.reference.interface import as_reference
    from tests.ds_helpers import pair_batch

    engines = engines_for(model_dir, cpu_ds_config(micro=4))
    before = full_weights(engines.policy)
    batch, keys = pair_batch(tokenizer, [0, 1, 2, 3])
    draws = sample_draws(len(keys), batch.response_lengths, 4, "l_over_L", keys=keys)
    own_keys = [DrawKey(key.seed, f"{key.example_id}:reference") for key in keys]
    reference_draws = sample_draws(len(keys), batch.response_lengths, 4, "l_over_L", keys=own_keys)
    result = preference_micro_step(
        engines.policy, as_reference(engines.reference), batch, draws, mask_token_id=MASK,
        loss_config=LossConfig(beta=0.5),
        max_tokens_per_forward=max_tokens, max_tokens_no_grad=max_tokens, loss_scale=1.0,
        reference_draws=reference_draws,
    )  # fmt: skip
    engines.policy.step()
    return before, full_weights(engines.policy), result


def test_independent_reference_draws_add_noise_where_shared_draws_cancel_it(
    tiny_gemma_dir, tokenizer, unchunked
):
    _, _, _, shared = unchunked
    # Policy = reference at step 1: shared draws give h = 0 exactly, independent ones only on average.
    assert shared[0].metrics["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert shared[0].metrics["vrpo/diff_stderr"] == 0.0
    before, after_whole, whole = _independent_reference_step(tiny_gemma_dir, tokenizer, 1 << 20)
    assert abs(whole.metrics["loss"] - 0.693147) > 1e-3
    assert whole.metrics["vrpo/diff_stderr"] > 0.01  # measured 0.028; 0 when shared
    _, after_chunked, chunked = _independent_reference_step(tiny_gemma_dir, tokenizer, 1)
    assert chunked.metrics["loss"] == pytest.approx(whole.metrics["loss"], abs=1e-6)
    assert max(float((after_whole[k] - before[k]).abs().max()) for k in before) > 1e-3
    _assert_same_weights(after_chunked, after_whole)


def _sequence_step_with_reference_terms(model_dir, tokenizer, reference, max_tokens):
    engines = engines_for(model_dir, cpu_ds_config(micro=4))
    before = full_weights(engines.policy)
    result, _, _ = micro_step(
        replace(engines, reference=reference), tokenizer, [0, 1, 2, 3], max_tokens=max_tokens,
        loss_config=LossConfig(beta=0.5),
    )  # fmt: skip
    engines.policy.step()
    return before, full_weights(engines.policy), result


def test_chunked_equals_unchunked_when_each_pair_has_its_own_coefficient(
    tiny_gemma_dir, tokenizer, reference_terms
):
    """At step 1 an engine reference equals the policy and every pair's ∂ℓ/∂h is the same, so a
    mix-up of pairs in the two-pass path would go unseen; random reference terms make them differ."""
    before, after_whole, whole = _sequence_step_with_reference_terms(
        tiny_gemma_dir, tokenizer, reference_terms, 1 << 20
    )
    _, after_chunked, chunked = _sequence_step_with_reference_terms(
        tiny_gemma_dir, tokenizer, reference_terms, 1
    )
    reference_logits = reference_terms.mean(1)[:4] - reference_terms.mean(1)[4:]
    assert (
        float(reference_logits.std()) > 0.2
    )  # measured 0.35: the pairs' h, hence their coefficients, differ
    assert chunked.sweeps > whole.sweeps and chunked.metrics["loss"] == pytest.approx(
        whole.metrics["loss"], abs=1e-6
    )
    assert max(float((after_whole[k] - before[k]).abs().max()) for k in before) > 1e-3
    _assert_same_weights(after_chunked, after_whole)
