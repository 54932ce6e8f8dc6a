import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.objective.draws import DrawKey, draw_keys, sample_draws


def _same(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("example", "draw", "masked", "scored", "weight")
    )


@pytest.mark.parametrize("estimator", ["l_over_L", "one_over_t", "trajectory"])
def test_same_keys_give_identical_draws_and_other_keys_do_not(estimator):
    keys = draw_keys(["a", "b", 7], seed=3, epoch=1)
    first = sample_draws(3, [5, 9, 4], 6, estimator, keys=keys)
    again = sample_draws(3, [5, 9, 4], 6, estimator, keys=list(keys))
    assert _same(first, again)
    for other in (draw_keys(["a", "b", 7], seed=4, epoch=1), draw_keys(["a", "b", 7], seed=3, epoch=2)):
        assert not torch.equal(first.masked, sample_draws(3, [5, 9, 4], 6, estimator, keys=other).masked)


def test_a_response_draws_do_not_depend_on_its_batch_neighbours():
    alone = sample_draws(1, [9], 4, keys=[DrawKey(0, "b")])
    batch = sample_draws(3, [5, 9, 4], 4, keys=draw_keys(["a", "b", "c"]))
    rows = batch.example == 1
    assert torch.equal(alone.masked, batch.masked[rows][:, :9])
    assert torch.equal(alone.scored, batch.scored[rows][:, :9])
    assert torch.equal(alone.weight, batch.weight[rows]) and torch.equal(alone.draw, batch.draw[rows])


def test_l_over_L_takes_mask_count_k_from_stratum_k_and_masks_exactly_that_many():
    length, budget = 12, 4
    draws = sample_draws(50, [length] * 50, budget, "l_over_L", keys=draw_keys(range(50)))
    counts = draws.masked.sum(1)
    stratum_low = draws.draw * length // budget + 1  # l = floor(s·L) + 1 with s in [k/n, (k+1)/n)
    stratum_high = (draws.draw + 1) * length // budget
    assert bool(((counts >= stratum_low) & (counts <= stratum_high)).all())
    assert torch.allclose(draws.weight, length / counts.double())
    assert torch.equal(draws.masked, draws.scored)


def test_one_over_t_takes_timestep_k_from_stratum_k():
    budget = 5
    draws = sample_draws(40, [8] * 40, budget, "one_over_t", keys=draw_keys(range(40)))
    t = 1 / draws.weight
    assert bool(((t > draws.draw / budget) & (t <= (draws.draw + 1) / budget)).all())


def test_unstratified_mask_counts_cover_the_whole_range_in_every_draw_slot():
    draws = sample_draws(300, [10] * 300, 2, "l_over_L", keys=draw_keys(range(300)), stratified=False)
    first_slot = draws.masked[draws.draw == 0].sum(1)
    assert int(first_slot.min()) == 1 and int(first_slot.max()) == 10


def test_trajectory_reveals_each_position_once_in_T_steps():
    draws = sample_draws(2, [7, 3], 1, "trajectory", keys=draw_keys(["x", "y"]), steps=3)
    for example, length in ((0, 7), (1, 3)):
        rows = draws.example == example
        scored, masked = draws.scored[rows][:, :length], draws.masked[rows][:, :length]
        assert scored.shape[0] == 3
        assert torch.equal(scored.sum(0), torch.ones(length, dtype=torch.long))  # a partition
        assert bool((scored <= masked).all())
        assert bool(masked[0].all())  # step 0 starts fully masked
        for step in range(3):  # step s masks exactly the groups not yet revealed
            assert torch.equal(masked[step], scored[step:].any(0))
    assert torch.equal(draws.weight, torch.ones(6, dtype=torch.float64))


def test_draws_never_touch_columns_beyond_a_response():
    draws = sample_draws(2, [2, 9], 3, "l_over_L")
    assert not bool(draws.masked[draws.example == 0][:, 2:].any())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=2, response_lengths=[3, 0], budget=2), "response 1 of the batch is empty"),
        (dict(batch_size=1, response_lengths=[3], budget=0), "budget must be at least 1"),
        (dict(batch_size=1, response_lengths=[3], budget=1, estimator="x"), "unknown estimator 'x'"),
        (dict(batch_size=2, response_lengths=[3], budget=1), "1 response lengths for batch_size 2"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(DsdpoError, match=message):
        sample_draws(**kwargs)


@pytest.mark.parametrize("estimator", ["l_over_L", "one_over_t"])
def test_chosen_and_rejected_draw_k_share_stratum_k(estimator):
    """The per-draw objective pairs draw k of y_w with draw k of y_l: same stratum, own key."""
    from dsdpo.objective.draws import pair_draws

    n, length = 4, 40
    draws = pair_draws(
        ["a", "b"], [length] * 4, n, estimator, seed=3, epoch=0, block_size=None, response_starts=[0] * 4
    )  # rows: a, b chosen; a, b rejected
    fraction = draws.masked.sum(1).double() / length  # ≈ the stratum's u (l/L) or t
    for row in range(draws.num_rows):
        k = int(draws.draw[row])
        assert k / n - 0.1 <= fraction[row] <= (k + 1) / n + 0.1, (row, k, float(fraction[row]))
    chosen, rejected = draws.masked[draws.example == 0], draws.masked[draws.example == 2]
    assert not torch.equal(chosen, rejected)  # own masks: keyed by side
