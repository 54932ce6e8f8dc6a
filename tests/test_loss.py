"""Each loss against numbers worked out by hand with the math module.

One pair: policy chosen −10, policy rejected −12, reference chosen −11, reference rejected −11.5, β = 0.5.
  chosen log-ratio   −10 − (−11)   = 1.0      → reward r_w = β·1.0  = 0.5
  rejected log-ratio −12 − (−11.5) = −0.5     → reward r_l = β·−0.5 = −0.25
  h = 1.0 − (−0.5) = 1.5,  βh = 0.75
  −log σ(0.75) = log(1 + e^−0.75) = softplus(−0.75),   −log σ(−0.75) = softplus(0.75)
"""

import math

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.loss import LossConfig, preference_loss

PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LossConfig("sigmoid", beta=0.5), softplus(-0.75)),  # 0.3868
        (LossConfig("ipo", beta=0.5), (1.5 - 1 / (2 * 0.5)) ** 2),  # (1.5 − 1)² = 0.25
        (LossConfig("hinge", beta=0.5), 1 - 0.75),  # max(0, 1 − 0.75)
        (LossConfig("cdpo", beta=0.5, label_smoothing=0.1), 0.9 * softplus(-0.75) + 0.1 * softplus(0.75)),
        (
            LossConfig("robust", beta=0.5, label_smoothing=0.1),
            (0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / (1 - 0.2),
        ),
    ],
)
def test_losses_match_hand_computed_values(config, expected):
    out = preference_loss(PC, PR, RC, RR, config)
    assert float(out.losses[0]) == pytest.approx(expected, rel=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.25)


def test_soft_preference_uses_the_per_pair_probability():
    out = preference_loss(PC, PR, RC, RR, LossConfig("soft", beta=0.5), preference_prob=torch.tensor([0.7]))
    assert float(out.losses[0]) == pytest.approx(0.7 * softplus(-0.75) + 0.3 * softplus(0.75), rel=1e-6)
    # p = 1 is plain DPO
    hard = preference_loss(PC, PR, RC, RR, LossConfig("soft", beta=0.5), preference_prob=torch.tensor([1.0]))
    assert float(hard.losses[0]) == pytest.approx(softplus(-0.75), rel=1e-6)


def test_reference_free_drops_the_reference():
    # h = −10 − (−12) = 2, βh = 1
    out = preference_loss(PC, PR, None, None, LossConfig(beta=0.5, reference_free=True))
    assert float(out.losses[0]) == pytest.approx(softplus(-1.0), rel=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(-5.0)


def test_metrics_have_trl_names_and_batch_means():
    # Second pair: policy prefers the rejected one: chosen ratio −1, rejected ratio +1.
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.5, -6.0])
    out = preference_loss(pc, pr, rc, rr, LossConfig(beta=0.5))
    metrics = out.metrics(pc, pr)
    assert metrics["rewards/chosen"] == pytest.approx((0.5 + -0.5) / 2)
    assert metrics["rewards/rejected"] == pytest.approx((-0.25 + 0.5) / 2)
    assert metrics["rewards/margins"] == pytest.approx((0.75 + -1.0) / 2)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    assert metrics["logps/chosen"] == pytest.approx(-7.5)
    assert metrics["loss"] == pytest.approx((softplus(-0.75) + softplus(1.0)) / 2, rel=1e-6)


def test_gradient_of_dpo_with_respect_to_the_scores():
    # ∂/∂B̂_θ(y_w) of −log σ(βh) is −β σ(−βh) = −0.5 · σ(−0.75)
    pc = PC.clone().requires_grad_()
    preference_loss(pc, PR, RC, RR, LossConfig(beta=0.5)).loss.backward()
    assert float(pc.grad[0]) == pytest.approx(-0.5 / (1 + math.exp(0.75)), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(type="kto"), "loss.type: unknown loss 'kto'"),
        (dict(beta=0.0), "loss.beta must be positive"),
        (dict(type="robust", label_smoothing=0.5), r"loss.label_smoothing must be in \[0, 0.5\)"),
        (dict(type="sigmoid", label_smoothing=0.1), "used by cdpo and robust only"),
    ],
)
def test_bad_loss_configs_name_the_field(kwargs, message):
    with pytest.raises(DsdpoError, match=message):
        LossConfig(**kwargs)


def test_missing_reference_or_preference_probability_is_an_error():
    with pytest.raises(DsdpoError, match="reference scores are missing"):
        preference_loss(PC, PR, None, None, LossConfig())
    with pytest.raises(DsdpoError, match="needs a preference_prob"):
        preference_loss(PC, PR, RC, RR, LossConfig("soft"))
