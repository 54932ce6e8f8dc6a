import itertools
import math

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.objective.chunks import plan_chunks
from dsdpo.objective.draws import draw_keys, sample_draws
from dsdpo.objective.elbo import ScoringBatch, elbo, elbo_terms, exact_elbo, forward_rows
from dsdpo.objective.logprobs import MaskedTokenScorer

MASK = 4  # the tiny tokenizer's [MASK]


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two prompt/response pairs, right-padded: responses of 4 and 6 tokens."""
    rows = [("Q: 2+3?", "A: 5"), ("Q: 12-4?", "A: 8 ok")]
    ids, response, attention = [], [], []
    for prompt, answer in rows:
        p, a = tokenizer(prompt).input_ids, tokenizer(answer).input_ids
        ids.append(p + a)
        response.append([0] * len(p) + [1] * len(a))
    width = max(map(len, ids)) + 2  # padding beyond the longest row too
    for i in range(len(rows)):
        pad = width - len(ids[i])
        attention.append([1] * len(ids[i]) + [0] * pad)
        ids[i] = ids[i] + [tokenizer.pad_token_id] * pad
        response[i] = response[i] + [0] * pad
    return torch.tensor(ids), torch.tensor(response).bool(), torch.tensor(attention)


def _hand_exact_elbo(model, ids, response, attention):
    """B = Σ_M 1/(|M| C(L,|M|)) Σ_{i∈M} log p(y_i | y with M masked), with plain model calls."""
    length = int(attention.sum())  # right padding: score the unpadded sequence, no attention mask
    ids, response = ids[:length], response[:length]
    positions = response.nonzero().flatten().tolist()
    length, total = len(positions), 0.0
    for size in range(1, length + 1):
        for subset in itertools.combinations(positions, size):
            noisy = ids.clone()
            noisy[list(subset)] = MASK
            logits = model(input_ids=noisy[None]).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            total += sum(float(logp[i, ids[i]]) for i in subset) / (size * math.comb(length, size))
    return total


def test_exact_elbo_matches_a_hand_enumeration_with_plain_model_calls(tiny_gemma, batch):
    ids, response, attention = batch
    exact = exact_elbo(tiny_gemma, ids, response, mask_token_id=MASK, attention_mask=attention)
    with torch.no_grad():
        hand = [_hand_exact_elbo(tiny_gemma, ids[b], response[b], attention[b]) for b in range(2)]
    assert exact.tolist() == pytest.approx(hand, abs=1e-4)


@pytest.mark.parametrize(
    ("estimator", "steps"), [("l_over_L", None), ("one_over_t", None), ("trajectory", None)]
)
def test_monte_carlo_mean_converges_to_the_exact_elbo(tiny_gemma, batch, estimator, steps):
    ids, response, attention = batch
    exact = exact_elbo(tiny_gemma, ids, response, mask_token_id=MASK, attention_mask=attention)
    repeats = 300  # independent estimates (budget 8 each) per response
    keys = draw_keys([f"{b}-{r}" for r in range(repeats) for b in range(2)], seed=11)
    big = (ids.repeat(repeats, 1), response.repeat(repeats, 1), attention.repeat(repeats, 1))
    draws = sample_draws(2 * repeats, big[1].sum(1), 8, estimator, keys=keys, steps=steps)
    with torch.no_grad():
        terms = elbo_terms(
            tiny_gemma,
            big[0],
            big[1],
            mask_token_id=MASK,
            draws=draws,
            attention_mask=big[2],
            max_tokens_per_forward=1 << 16,
        )
    estimates = terms.mean(1).view(repeats, 2)
    mean, stderr = estimates.mean(0), estimates.std(0) / repeats**0.5
    # Within 5 standard errors (one_over_t has heavy tails; its std error is large, not small).
    assert bool(((mean - exact).abs() < 5 * stderr + 1e-4).all()), (mean, exact, stderr)


def test_trajectory_with_fewer_steps_costs_fewer_rows(batch):
    _ids, response, _ = batch
    draws = sample_draws(2, response.sum(1), 2, "trajectory", steps=2)
    assert draws.num_rows == 2 * 2 * 2


def test_same_keys_same_scores_and_padding_or_neighbours_change_nothing(tiny_gemma, batch):
    ids, response, attention = batch
    kwargs = dict(mask_token_id=MASK, budget=4, attention_mask=attention, seed=5)
    with torch.no_grad():
        both = elbo(tiny_gemma, ids, response, keys=draw_keys(["p", "q"], seed=5), **kwargs)
        again = elbo(tiny_gemma, ids, response, keys=draw_keys(["p", "q"], seed=5), **kwargs)
        length = int(attention[1].sum())
        alone = elbo(
            tiny_gemma,
            ids[1:, :length],
            response[1:, :length],
            mask_token_id=MASK,
            budget=4,
            keys=draw_keys(["q"], seed=5),
        )
    assert torch.equal(both, again)
    assert float(alone[0]) == pytest.approx(float(both[1]), abs=1e-5)


def test_only_response_tokens_are_masked_and_padding_is_never_scored(batch):
    ids, response, attention = batch
    draws = sample_draws(2, response.sum(1), 16, "one_over_t")
    inputs = forward_rows(
        ScoringBatch.build(ids, response, attention), draws, torch.arange(draws.num_rows), MASK
    )
    row_response = response[draws.example][:, : inputs["input_ids"].shape[1]]
    changed = inputs["input_ids"] != ids[draws.example][:, : inputs["input_ids"].shape[1]]
    assert bool((changed <= row_response).all())
    assert bool((inputs["input_ids"][changed] == MASK).all())
    assert bool((inputs["scored"] <= row_response).all())
    assert inputs["input_ids"].shape[1] == int(attention.sum(1).max())  # trailing padding trimmed


def test_chunked_forwards_give_the_same_terms_in_the_planned_number_of_calls(tiny_gemma, batch):
    ids, response, attention = batch
    draws = sample_draws(2, response.sum(1), 8, "l_over_L")
    calls = []
    hook = tiny_gemma.model.register_forward_hook(
        lambda *_: calls.append(1)
    )  # on the trunk: the head sees masked positions only
    try:
        with torch.no_grad():
            whole = elbo_terms(
                tiny_gemma, ids, response, mask_token_id=MASK, draws=draws, attention_mask=attention
            )
            assert len(calls) == 1  # all 16 rows in one forward
            chunked = elbo_terms(
                tiny_gemma,
                ids,
                response,
                mask_token_id=MASK,
                draws=draws,
                attention_mask=attention,
                max_tokens_per_forward=40,
            )
    finally:
        hook.remove()
    chunks = plan_chunks(ScoringBatch.build(ids, response, attention), draws, 40)
    assert len(calls) - 1 == len(chunks) > 1
    assert torch.allclose(whole, chunked, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_gemma", "tiny_bert"])
def test_head_on_masked_positions_only_equals_full_logits(request, fixture, tiny_bert_dir, batch):
    if fixture == "tiny_bert":
        from dsdpo.models.loading import load_model

        model = load_model(tiny_bert_dir).eval()
    else:
        model = request.getfixturevalue(fixture)
    ids, response, attention = batch
    draws = sample_draws(2, response.sum(1), 4, "l_over_L")
    inputs = forward_rows(
        ScoringBatch.build(ids, response, attention), draws, torch.arange(draws.num_rows), MASK
    )
    split = MaskedTokenScorer(model)
    full = MaskedTokenScorer(model)
    full._split = None
    assert split._split is not None
    with torch.no_grad():
        assert torch.allclose(split(**inputs), full(**inputs), atol=1e-5)


def _sums_and_gradients(model, inputs, row_weights, *, slice_bytes, split):
    model.zero_grad(set_to_none=True)
    scorer = MaskedTokenScorer(model, head_slice_bytes=slice_bytes)
    if not split:
        scorer._split = None  # the full-logits path, sliced after the gather
    sums = scorer(**inputs)
    (sums * row_weights).sum().backward()
    return sums.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("path", ["split", "full logits", "lora"])
def test_output_layer_in_slices_gives_the_same_scores_and_gradients(tiny_gemma_dir, batch, path):
    """The head a few positions at a time (each slice checkpointed) against all positions at once."""
    from peft import LoraConfig, get_peft_model

    from dsdpo.models.loading import load_model

    model = load_model(tiny_gemma_dir).train()
    vocab = model.config.vocab_size
    if path == "lora":  # adapters on every block linear (not the output layer), B not zero: every
        # adapter weight gets a gradient
        adapters = LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, adapters)
    ids, response, attention = batch
    draws = sample_draws(2, response.sum(1), 4, "l_over_L")
    inputs = forward_rows(
        ScoringBatch.build(ids, response, attention), draws, torch.arange(draws.num_rows), MASK
    )
    positions = int(inputs["scored"].sum())
    assert positions % 7 and positions > 7  # slices of 7 leave a shorter last one
    row_weights = torch.randn(draws.num_rows, generator=torch.Generator().manual_seed(0))
    split = path != "full logits"
    whole_sums, whole_grads = _sums_and_gradients(
        model, inputs, row_weights, slice_bytes=4 * vocab * positions, split=split
    )
    assert whole_grads and all(bool(grad.any()) for grad in whole_grads)
    for slice_positions in (7, 1):
        sums, grads = _sums_and_gradients(
            model, inputs, row_weights, slice_bytes=4 * vocab * slice_positions, split=split
        )
        assert torch.allclose(sums, whole_sums, atol=1e-5)
        for whole, sliced in zip(whole_grads, grads, strict=True):  # fp32 sums in another order
            assert torch.allclose(sliced, whole, rtol=1e-4, atol=1e-5)


def test_shared_draws_cancel_noise_in_the_policy_reference_difference(tiny_gemma, tiny_gemma_dir, batch):
    """Antithetic sampling (VRPO): Var[B̂_θ − B̂_ref] with shared draws ≪ with independent draws."""
    from dsdpo.models.loading import load_model

    reference = load_model(tiny_gemma_dir).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))  # a slightly different model: 5% relative noise
    ids, response, attention = batch
    repeats = 64
    big = (ids.repeat(repeats, 1), response.repeat(repeats, 1), attention.repeat(repeats, 1))
    ids_list = list(range(2 * repeats))
    draws_a = sample_draws(2 * repeats, big[1].sum(1), 2, keys=draw_keys(ids_list, seed=1))
    draws_b = sample_draws(2 * repeats, big[1].sum(1), 2, keys=draw_keys(ids_list, seed=2))
    common = dict(mask_token_id=MASK, attention_mask=big[2], max_tokens_per_forward=1 << 16)
    with torch.no_grad():
        policy = elbo_terms(tiny_gemma, big[0], big[1], draws=draws_a, **common).mean(1)
        ref_shared = elbo_terms(reference, big[0], big[1], draws=draws_a, **common).mean(1)
        ref_independent = elbo_terms(reference, big[0], big[1], draws=draws_b, **common).mean(1)
    shared_var = (policy - ref_shared).view(repeats, 2).var(0)
    independent_var = (policy - ref_independent).view(repeats, 2).var(0)
    assert bool((shared_var < 0.05 * independent_var).all()), (shared_var, independent_var)


def test_padding_does_not_make_a_bidirectional_decoder_causal(tiny_gemma, batch):
    ids, response, attention = batch  # row 0 is padded
    scorer = MaskedTokenScorer(tiny_gemma)
    scored = torch.zeros_like(response)
    scored[0, 0] = True  # the first token's log-probability...
    changed = ids.clone()
    changed[0, int(attention[0].sum()) - 1] += 1  # ...must depend on the last real token
    with torch.no_grad():
        before = scorer(ids, attention, scored, ids)[0]
        after = scorer(changed, attention, scored, ids)[0]
    assert abs(float(before - after)) > 1e-6


def test_bad_batches_are_clear_errors(tiny_gemma, batch):
    ids, response, attention = batch
    empty = response.clone()
    empty[1] = False
    with pytest.raises(DsdpoError, match="response 1 of the batch is empty"):
        elbo(tiny_gemma, ids, empty, mask_token_id=MASK, attention_mask=attention)
    padded_response = response | (attention == 0)
    with pytest.raises(DsdpoError, match="marks padding positions"):
        elbo(tiny_gemma, ids, padded_response, mask_token_id=MASK, attention_mask=attention)
    wrong = sample_draws(2, [3, 3], 2)
    with pytest.raises(DsdpoError, match="draws were made for response lengths"):
        elbo_terms(tiny_gemma, ids, response, mask_token_id=MASK, draws=wrong, attention_mask=attention)
