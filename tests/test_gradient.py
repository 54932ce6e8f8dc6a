"""The chunked two-pass gradient equals the unchunked one, through real ZeRO-3 engines on the CPU."""

import pytest
import torch

from tests.ds_helpers import cpu_ds_config, engines_for, full_weights, micro_step


def _train_one_step(
    model_dir, tokenizer, micro_batches, *, max_tokens, budget=4, estimator="l_over_L", loss_config=None
):
    engines = engines_for(
        model_dir, cpu_ds_config(micro=len(micro_batches[0]), accumulation=len(micro_batches))
    )
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
                **({"loss_config": loss_config} if loss_config else {}),
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


def test_batch_level_and_per_token_losses_chunk_exactly(tiny_gemma_dir, tokenizer):
    """AOT sorts over the micro-batch; sigmoid_norm, WPO and the RPO term read response lengths."""
    from dsdpo.loss import LossConfig

    loss = LossConfig("aot_unpaired,sigmoid_norm", beta=0.5, weights="1,0.5", wpo=True, sft_weight=0.1)
    runs = [
        _train_one_step(tiny_gemma_dir, tokenizer, [[0, 1, 2, 3]], max_tokens=m, loss_config=loss)
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
