"""The one forward/backward loop over chunks (dsdpo.objective.chunk_loop) on a plain tiny model: its
chunks and fillers give the gradient of one forward of every row, each rank's call count is kept,
and a chunk whose loss is not finite backprops zero and says so.

The engine's part (score rows, backprop a loss) is autograd here; through real ZeRO-3 engines the
loop is checked by tests/test_gradient.py, test_sft.py and test_nonfinite.py."""

import pytest
import torch

from dsdpo.models.loading import load_model
from dsdpo.objective.chunk_loop import backward_chunks
from dsdpo.objective.draws import sample_draws
from dsdpo.objective.elbo import forward_rows
from dsdpo.objective.logprobs import as_scorer
from tests.ds_helpers import MASK, pair_batch


class Policy:
    """What the loop asks of an engine: row sums from a forward, and a backward (counted)."""

    def __init__(self, model):
        self.scorer, self.forwards, self.backwards = as_scorer(model), 0, 0

    def __call__(self, **inputs):
        self.forwards += 1
        return self.scorer(**inputs)

    def backward(self, loss, scale_wrt_gas):
        self.backwards += 1
        loss.backward()


@pytest.fixture(scope="module")
def model(tiny_gemma_dir):
    return load_model(tiny_gemma_dir).eval()


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Two pairs, two draws each: 8 rows, and a random coefficient for each."""
    batch, keys = pair_batch(tokenizer, [0, 1])
    draws = sample_draws(len(keys), batch.response_lengths, 2, "l_over_L", keys=keys)
    coefficients = torch.randn(draws.num_rows, generator=torch.Generator().manual_seed(0))
    return batch, draws, coefficients


def _gradient(model) -> torch.Tensor:
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return gradient


def _one_forward_gradient(model, rows, coefficients) -> torch.Tensor:
    """∇ Σ_r coefficient_r s_r with every row in one forward, no loop."""
    batch, draws, _ = rows
    sums = as_scorer(model)(**forward_rows(batch, draws, torch.arange(draws.num_rows), MASK))
    (sums * coefficients).sum().backward()
    return _gradient(model)


def test_chunks_and_fillers_give_the_gradient_of_one_forward(model, rows):
    batch, draws, coefficients = rows
    expected = _one_forward_gradient(model, rows, coefficients)
    chunks = list(torch.arange(draws.num_rows).split(3))  # 3, 3, 2 rows
    policy = Policy(model)
    finite = backward_chunks(
        policy, batch, draws, chunks, len(chunks) + 2, mask_token_id=MASK,
        chunk_loss=lambda rows, sums: (sums * coefficients[rows]).sum(),
    )  # fmt: skip
    assert finite
    assert (policy.forwards, policy.backwards) == (5, 5)  # the other ranks' count: two fillers
    assert torch.allclose(_gradient(model), expected, atol=1e-6, rtol=1e-5)


def test_a_chunk_whose_loss_is_not_finite_backprops_zero_and_says_so(model, rows):
    batch, draws, coefficients = rows
    chunks = [torch.arange(0, 4), torch.arange(4, 8)]
    expected = _one_forward_gradient(model, rows, coefficients * (torch.arange(draws.num_rows) >= 4))
    policy = Policy(model)

    def first_chunk_not_finite(rows, sums):
        return None if int(rows[0]) == 0 else (sums * coefficients[rows]).sum()

    finite = backward_chunks(
        policy, batch, draws, chunks, 3, mask_token_id=MASK, chunk_loss=first_chunk_not_finite
    )
    assert not finite
    assert (policy.forwards, policy.backwards) == (3, 3)  # the skipped chunk still calls backward
    assert torch.allclose(_gradient(model), expected, atol=1e-6, rtol=1e-5)
