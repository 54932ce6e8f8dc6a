"""The block-diffusion ELBO (dsdpo/objective/blocks.py; docs/design.md, "The block-diffusion ELBO") on the
tiny
SDAR and LLaDA 2.x checkpoints, against the numbers the published code computed (tests/fixtures/
families/{sdar,llada2}/expected.json, build_sdar.py and build_llada2.py: every mask set of every
block, each scored by the published model fed the sequence up to the end of that block under its
sampler's block-causal mask)."""

import json
from pathlib import Path

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.models.loading import load_model
from dsdpo.models.tiny import build_tokenizer
from dsdpo.objective.blocks import response_segments
from dsdpo.objective.chunks import plan_chunks
from dsdpo.objective.draws import DrawKey, sample_draws
from dsdpo.objective.elbo import ScoringBatch, draw_terms, elbo, exact_elbo, row_logprob_sums
from dsdpo.objective.logprobs import MaskedTokenScorer

FIXTURES = Path(__file__).parent / "fixtures" / "families"
FIXTURE = FIXTURES / "sdar"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
BLOCK = EXPECTED["block_size"]
MASK = build_tokenizer().mask_token_id


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE).eval()


@pytest.fixture(scope="module", params=["sdar", "llada2"])
def block_model(request):
    """Each block family's model and its published exact block ELBOs (both fixtures' blocks are 4)."""
    expected = json.loads((FIXTURES / request.param / "expected.json").read_text())
    assert expected["block_size"] == BLOCK
    return load_model(FIXTURES / request.param).eval(), expected["cases"]


def right_padded(cases) -> ScoringBatch:
    """The cases' prompt + response rows, right padded (padding id 0), responses marked."""
    rows = [case["prompt_ids"] + case["response_ids"] for case in cases]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    response, attention = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
    for b, (case, row) in enumerate(zip(cases, rows, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        response[b, len(case["prompt_ids"]) : len(row)] = True
        attention[b, : len(row)] = 1
    return ScoringBatch.build(ids, response, attention)


def test_responses_split_where_the_blocks_of_prompt_plus_response_do():
    assert response_segments(5, 3, 4) == [(0, 3)]  # positions 5-7: block 1
    assert response_segments(1, 8, 4) == [(0, 3), (3, 7), (7, 8)]
    assert response_segments(4, 4, 4) == [(0, 4)]  # the prompt fills block 0
    assert response_segments(15, 10, 4) == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert response_segments(15, 10, None) == [(0, 10)]  # no blocks: one segment


def test_padded_batch_rows_score_as_rows_alone(block_model):
    """Alone, each case's exact ELBO is checked in tests/test_families.py; in one right-padded batch
    they give the same numbers, and so do Monte Carlo estimates with the same keys."""
    model, cases = block_model
    batch = right_padded(cases)
    exact = exact_elbo(
        model, batch.input_ids, batch.response_mask, mask_token_id=MASK, attention_mask=batch.attention_mask
    )
    assert exact.tolist() == pytest.approx([case["exact_elbo"] for case in cases], abs=1e-4)
    keys = [DrawKey(0, b) for b in range(len(cases))]
    with torch.no_grad():
        together = elbo(
            model, batch.input_ids, batch.response_mask, mask_token_id=MASK, budget=4, keys=keys,
            attention_mask=batch.attention_mask,
        )  # fmt: skip
        for b, case in enumerate(cases):
            alone = right_padded([case])
            score = elbo(
                model,
                alone.input_ids,
                alone.response_mask,
                mask_token_id=MASK,
                budget=4,
                keys=keys[b : b + 1],
            )
            assert together[b].item() == pytest.approx(score.item(), abs=1e-5)


@torch.no_grad()
def per_block_sums(model, batch: ScoringBatch, draws) -> torch.Tensor:
    """Each row's Σ w_i log p(y_i) with one forward per block, as the sampler sees a block: the sequence
    up to the block's end, earlier blocks clean, the block with the row's masks, later blocks absent."""
    sums = torch.zeros(draws.num_rows)
    for r in range(draws.num_rows):
        b = int(draws.example[r])
        positions = batch.response_positions[b, : int(batch.response_lengths[b])]
        masked, weights = draws.masked[r, : len(positions)], draws.scored[r, : len(positions)]
        for block in (positions // BLOCK).unique().tolist():
            end = min(int(batch.sequence_ends[b]), (block + 1) * BLOCK)
            ids = batch.input_ids[b, :end].clone()
            here = positions // BLOCK == block
            ids[positions[here & masked]] = MASK
            logprobs = model(input_ids=ids[None]).logits[0].log_softmax(-1)
            for position, weight in zip(positions[here].tolist(), weights[here].tolist(), strict=True):
                sums[r] += weight * logprobs[position, batch.input_ids[b, position]]
    return sums


# Every estimator's masks on SDAR; LLaDA 2.x (slower: its experts run one by one) with one of them.
@pytest.mark.parametrize(
    ("block_model", "estimator"),
    [("sdar", "l_over_L"), ("sdar", "one_over_t"), ("sdar", "trajectory"), ("llada2", "l_over_L")],
    indirect=["block_model"],
)
def test_one_forward_of_noised_and_clean_equals_one_forward_per_block(block_model, estimator):
    model, cases = block_model
    batch = right_padded(cases)
    draws = sample_draws(
        4, batch.response_lengths, 3, estimator, block_size=BLOCK, response_starts=batch.response_starts
    )
    with torch.no_grad():
        together = row_logprob_sums(MaskedTokenScorer(model), batch, draws, mask_token_id=MASK)
    assert torch.allclose(together, per_block_sums(model, batch, draws), atol=1e-4)


def test_block_draws_stratify_every_block_and_stay_inside_it():
    """Response of 8 tokens from position 1: blocks hold 3, 4 and 1 of them. With budget 4, draw k
    masks k+1 of the 4-token block (stratum k of 4), each masked token weighted L_b / l_b."""
    draws = sample_draws(1, [8], 4, block_size=4, response_starts=[1])
    counts = [
        [int(draws.masked[k, first:end].sum()) for first, end in ((0, 3), (3, 7), (7, 8))] for k in range(4)
    ]
    assert [c[1] for c in counts] == [1, 2, 3, 4]
    assert [c[2] for c in counts] == [1, 1, 1, 1]
    assert [c[0] for c in counts] == sorted(c[0] for c in counts) and {c[0] for c in counts} <= {1, 2, 3}
    for k, (first_block, middle, _) in enumerate(counts):
        expected = torch.tensor([3 / first_block] * 3 + [4 / middle] * 4 + [1.0])
        assert torch.equal(draws.scored[k], expected.double() * draws.masked[k]), k
    again = sample_draws(1, [8], 4, block_size=4, response_starts=[1])
    assert torch.equal(draws.masked, again.masked)  # keyed: the reference, a resumed run see the same


@pytest.mark.parametrize("estimator", ["l_over_L", "one_over_t", "trajectory"])
def test_monte_carlo_estimate_converges_to_the_published_exact_block_elbo(block_model, estimator):
    model, cases = block_model
    batch = right_padded(cases)
    # The trajectory estimator with T = L_b steps in each block (the default): any-order AR, mean B.
    draws = sample_draws(
        len(cases),
        batch.response_lengths,
        128,
        estimator,
        block_size=BLOCK,
        response_starts=batch.response_starts,
    )
    with torch.no_grad():
        terms = draw_terms(row_logprob_sums(model, batch, draws, mask_token_id=MASK), draws).double()
    error = (terms.mean(1) - torch.tensor([case["exact_elbo"] for case in cases])).abs()
    stderr = terms.std(1) / terms.shape[1] ** 0.5
    assert torch.all(error < 4 * stderr + 1e-3), (error, stderr)


def test_chunked_gradient_equals_the_unchunked_one_through_zero3_engines(tokenizer):
    """One row a forward (two passes) and every row in one forward give the same step: chunking stays
    exact with [noised ; clean] rows (real ZeRO-3 engines on the CPU, the SDAR checkpoint)."""
    from tests.ds_helpers import cpu_ds_config, engines_for, full_weights, micro_step

    steps = []
    for max_tokens in (1 << 20, 1):
        engines = engines_for(FIXTURE, cpu_ds_config(micro=4))
        before = full_weights(engines.policy)
        result, _, draws = micro_step(
            engines, tokenizer, [0, 1, 2, 3], max_tokens=max_tokens, block_size=BLOCK
        )
        engines.policy.step()
        steps.append((before, full_weights(engines.policy), result))
    assert draws.block_size == BLOCK
    (before, whole, unchunked), (_, chunked, one_row) = steps
    assert unchunked.sweeps == 3 and one_row.sweeps > 30
    assert one_row.metrics["loss"] == pytest.approx(unchunked.metrics["loss"], abs=1e-6)
    assert max(float((whole[k] - before[k]).abs().max()) for k in before) > 1e-3
    for name in whole:
        assert torch.allclose(chunked[name], whole[name], atol=1e-6, rtol=0), name


def test_draws_made_for_another_block_size_are_refused(model):
    batch = right_padded(EXPECTED["cases"][:1])
    whole = sample_draws(1, batch.response_lengths, 2)  # drawn as if SDAR were no block model
    with pytest.raises(DsdpoError, match="block size None, but the model's is 4"):
        row_logprob_sums(model, batch, whole, mask_token_id=MASK)


def test_a_row_counts_twice_its_length_in_the_token_budget():
    """A forward holds [noised ; clean]: a budget of 2 × the sequence takes one row, 4 × two."""
    batch = right_padded(EXPECTED["cases"][:1])
    draws = sample_draws(
        1, batch.response_lengths, 4, block_size=BLOCK, response_starts=batch.response_starts
    )
    width = int(batch.sequence_ends[0])
    assert [len(rows) for rows in plan_chunks(batch, draws, 2 * width)] == [1, 1, 1, 1]
    assert [len(rows) for rows in plan_chunks(batch, draws, 4 * width)] == [2, 2]
