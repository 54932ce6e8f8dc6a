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
from dsdpo.objective.losses import LossConfig, preference_loss

PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LossConfig("sigmoid", beta=0.5), softplus(-0.75)),  # 0.3868
        (LossConfig("ipo_sum", beta=0.5), (1.5 - 1 / (2 * 0.5)) ** 2),  # (1.5 − 1)² = 0.25
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
        (dict(beta=0.0), "loss.beta must be finite and > 0"),
        (dict(type="robust", label_smoothing=0.5), r"loss.label_smoothing must be in \[0, 0.5\)"),
        (
            dict(type="sigmoid", label_smoothing=0.1),
            "label_smoothing is used by cdpo, robust, exo_pair, aot, aot_unpaired only",
        ),
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


# The pair above with response lengths |y_w| = 2, |y_l| = 4: r_w = 1.0, r_l = -0.5, h = 1.5, β = 0.5.
LENGTHS = {"chosen_lengths": torch.tensor([2.0]), "rejected_lengths": torch.tensor([4.0])}


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


HAND_WORKED = [
    # EXO eq. 16 with the paper's ε = 1e-3, z = βh = 0.75.
    (
        LossConfig("exo_pair", beta=0.5, label_smoothing=1e-3),
        sigmoid(0.75) * (-softplus(-0.75) - math.log(0.999))
        + sigmoid(-0.75) * (-softplus(0.75) - math.log(1e-3)),
    ),
    # h̄ = 1/2 − (−0.5)/4 = 0.625, βh̄ = 0.3125.
    (LossConfig("sigmoid_norm", beta=0.5), softplus(-0.3125)),
    (LossConfig("apo_zero", beta=0.5), (1 - sigmoid(0.5)) + sigmoid(-0.25)),
    (LossConfig("apo_down", beta=0.5), sigmoid(0.5) + (1 - sigmoid(0.75))),
    (LossConfig("nca_pair", beta=0.5), softplus(-0.5) + 0.5 * softplus(0.5) + 0.5 * softplus(-0.25)),
    # TRL's bco_pair has no δ: −log σ(0.5) − log σ(0.25).
    (LossConfig("bco_pair", beta=0.5), softplus(-0.5) + softplus(-0.25)),
    # One pair: δ = mean(0.5, −0.25) = 0.125.
    (LossConfig("bco_pair_batch", beta=0.5), softplus(-(0.5 - 0.125)) + softplus(-0.25 - 0.125)),
    # TRL's ipo per token: 1/2 − (−0.5)/4 = 0.625, (0.625 − 1)² = 0.140625.
    (LossConfig("ipo", beta=0.5), 0.140625),
    (LossConfig("sppo_hard", beta=0.5), (1.0 - 1.0) ** 2 + (-0.5 + 1.0) ** 2),
    (LossConfig("discopop", beta=0.5), softplus(-0.75) * (1 - sigmoid(15)) + math.exp(-0.75) * sigmoid(15)),
    (LossConfig("sft", beta=0.5), 10 / 2),
    # f-DPO: z under JS, forward KL (α = 1) and α = 0.5, in the sigmoid loss.
    (LossConfig(beta=0.5, f_divergence="js"), softplus(-0.5 * (1.5 - (softplus(1.0) - softplus(-0.5))))),
    (
        LossConfig(beta=0.5, f_divergence="forward_kl", f_alpha=0.5),  # forward KL is α = 1 whatever f_alpha
        softplus(-0.5 * (math.exp(0.5) - math.exp(-1.0))),
    ),
    (
        LossConfig(beta=0.5, f_divergence="alpha", f_alpha=0.5),
        softplus(-0.5 * (math.exp(0.25) - math.exp(-0.5)) / 0.5),
    ),
    (LossConfig("ipo_sum", beta=0.5, f_divergence="forward_kl"), (math.exp(0.5) - math.exp(-1.0) - 1.0) ** 2),
    # Per token, each side's f' = 1 − e^(−r) divided by its own length: the 1s do not cancel.
    (
        LossConfig("ipo", beta=0.5, f_divergence="forward_kl"),
        ((1 - math.exp(-1.0)) / 2 - (1 - math.exp(0.5)) / 4 - 1.0) ** 2,
    ),
    # WPO without the alignment term: weight min(1, exp(−10/2 − 12/4)) = e^−8.
    (LossConfig(beta=0.5, wpo_unaligned=True), softplus(-0.75) * math.exp(-8)),
    # MPO: 0.8 · DPO + 0.2 · SPPO.
    (LossConfig("sigmoid,sppo_hard", beta=0.5, weights="0.8,0.2"), 0.8 * softplus(-0.75) + 0.2 * 0.25),
    # RPO: + 0.5 · NLL per token of the chosen response (10 / 2).
    (LossConfig(beta=0.5, sft_weight=0.5), softplus(-0.75) + 0.5 * 5),
    # The floor is inactive: the policy's chosen score (−10) is above the reference's (−11).
    (LossConfig(beta=0.5, chosen_floor=2.0), softplus(-0.75)),
]


@pytest.mark.parametrize(("config", "expected"), HAND_WORKED)
def test_more_losses_match_hand_computed_values(config, expected):
    out = preference_loss(PC, PR, RC, RR, config, **LENGTHS)
    assert float(out.losses[0]) == pytest.approx(expected, rel=1e-6)


def test_wpo_weight_is_capped_at_one():
    config = LossConfig(wpo_unaligned=True)
    out = preference_loss(torch.tensor([1.0]), torch.tensor([2.0]), RC, RR, config, **LENGTHS)
    plain = preference_loss(torch.tensor([1.0]), torch.tensor([2.0]), RC, RR, LossConfig(), **LENGTHS)
    assert float(out.losses[0]) == pytest.approx(float(plain.losses[0]))  # exp(1/2 + 2/4) > 1 → 1


@pytest.mark.parametrize("per_token", [False, True])
def test_chosen_floor_penalises_a_chosen_score_below_the_reference(per_token):
    # Reference chosen −9: the policy's −10 is 1 below it. h = (−10 + 9) − (−12 + 11.5) = −0.5.
    config = LossConfig(beta=0.5, chosen_floor=2.0, chosen_floor_per_token=per_token)
    out = preference_loss(PC, PR, torch.tensor([-9.0]), RR, config, **LENGTHS)
    assert float(out.losses[0]) == pytest.approx(softplus(0.25) + 2.0 * (0.5 if per_token else 1.0), rel=1e-6)


# Two pairs for the batch-level AOT losses: policy log-ratios B̂θ(y_w) − B̂θ(y_l) = [2, −1],
# reference ones [0.5, −2]; r_w = [1, 0.5], r_l = [−0.5, −0.5].
TWO = [torch.tensor(v) for v in ([-10.0, -5.0], [-12.0, -4.0], [-11.0, -5.5], [-11.5, -3.5])]


@pytest.mark.parametrize(
    ("loss_type", "deltas"),
    [
        ("aot", [1.0, 1.5]),  # sort([2, −1]) − sort([0.5, −2]) = [−1, 2] − [−2, 0.5]
        ("aot_unpaired", [1.0, 1.5]),  # sort([1, 0.5]) − sort([−0.5, −0.5]) = [0.5, 1] − [−0.5, −0.5]
    ],
)
def test_aot_losses_compare_sorted_log_ratios(loss_type, deltas):
    out = preference_loss(*TWO, LossConfig(loss_type, beta=0.5, label_smoothing=0.1))
    expected = [0.9 * softplus(-0.5 * d) + 0.1 * softplus(0.5 * d) for d in deltas]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_every_loss_type_has_a_hand_worked_test():
    from dsdpo.objective.losses import LOSS_TYPES

    tested = {"sigmoid", "ipo", "hinge", "cdpo", "robust", "soft", "aot", "aot_unpaired"}
    tested |= {t for config, _ in HAND_WORKED for t in config.types}
    assert set(LOSS_TYPES) <= tested


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "sigmoid,nope"}, "unknown loss 'nope'"),
        ({"type": "sigmoid,ipo", "weights": "1"}, "1 weights for 2 loss types"),
        ({"type": "sigmoid", "weights": "x"}, "not comma-separated numbers"),
        ({"type": "apo_zero", "f_divergence": "js"}, "applies to sigmoid"),
        ({"f_divergence": "tv"}, "unknown 'tv'"),
        ({"sft_weight": -1.0}, "sft_weight must be finite and >= 0"),
    ],
)
def test_bad_new_loss_settings_name_the_field(kwargs, message):
    with pytest.raises(DsdpoError, match=message):
        LossConfig(**kwargs)


def test_per_token_losses_need_lengths():
    with pytest.raises(DsdpoError, match="sigmoid_norm needs the response lengths"):
        preference_loss(PC, PR, RC, RR, LossConfig("sigmoid_norm"))


# Two pairs with mixed lengths for the sft normalisations: chosen scores −10 (|y| 2) and −30 (|y| 20).
SFT_SCORES = (torch.tensor([-10.0, -30.0]), torch.tensor([-12.0, -31.0]), torch.tensor([-11.0, -29.0]))
SFT_LENGTHS = {"chosen_lengths": torch.tensor([2.0, 20.0]), "rejected_lengths": torch.tensor([4.0, 20.0])}


@pytest.mark.parametrize(
    ("per_response", "expected"),
    [
        (False, (10 + 30) / (2 + 20)),  # TRL: the NLL per chosen token of the micro-batch, 1.818
        (True, (10 / 2 + 30 / 20) / 2),  # LLaDA: the mean over pairs of each NLL per token, 3.25
    ],
)
def test_sft_normalisations(per_response, expected):
    pc, pr, ref = SFT_SCORES
    config = LossConfig("sft", sft_per_response=per_response)
    out = preference_loss(pc, pr, ref, ref, config, **SFT_LENGTHS)
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    # RPO's term is the same sft loss, weighted: 0.5 · sft on top of DPO.
    rpo = LossConfig(sft_weight=0.5, sft_per_response=per_response)
    dpo = preference_loss(pc, pr, ref, ref, LossConfig(), **SFT_LENGTHS)
    with_rpo = preference_loss(pc, pr, ref, ref, rpo, **SFT_LENGTHS)
    assert float(with_rpo.loss) == pytest.approx(float(dpo.loss) + 0.5 * expected, rel=1e-6)


def test_bco_pair_batch_delta_carries_no_gradient():
    # TWO at β = 0.5: rewards a = βr_w = [0.5, 0.25], b = βr_l = [−0.25, −0.25], δ = 0.0625 held constant.
    # ∂/∂B̂θ(y_w)[0] of the mean loss is −β σ(−(a_0 − δ)) / 2; ∂/∂B̂θ(y_l)[0] is β σ(b_0 − δ) / 2.
    # (With one pair a δ with gradient gives the same numbers by symmetry: two are needed.)
    pc, pr, rc, rr = (v.clone() for v in TWO)
    pc.requires_grad_()
    pr.requires_grad_()
    preference_loss(pc, pr, rc, rr, LossConfig("bco_pair_batch", beta=0.5)).loss.backward()
    assert float(pc.grad[0]) == pytest.approx(-0.25 * sigmoid(-0.4375), rel=1e-6)
    assert float(pr.grad[0]) == pytest.approx(0.25 * sigmoid(-0.3125), rel=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_is_finite_where_e_to_the_minus_z_overflows(tau):
    # βh = −100 and −1000: e^(−βh) is inf in fp32 and σ(βh/τ) is 0, while e^(−βh)·σ(βh/τ) is tiny.
    h = torch.tensor([-200.0, -2000.0])
    zero = torch.zeros(2)
    config = LossConfig("discopop", beta=0.5, discopop_tau=tau)
    loss32 = preference_loss(h, zero, zero, zero, config).losses
    loss64 = preference_loss(h.double(), zero.double(), zero.double(), zero.double(), config).losses
    assert torch.isfinite(loss32).all() and torch.isfinite(loss64).all()
    z = -100.0  # by hand, in float64: (1 − m)·softplus(−z) + e^(−z)·m, m = σ(z/τ)
    m = math.exp(z / tau) / (1 + math.exp(z / tau))
    assert float(loss64[0]) == pytest.approx((1 - m) * softplus(-z) + math.exp(-z) * m, rel=1e-12)
    assert loss32.tolist() == pytest.approx(loss64.float().tolist(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": math.inf}, "loss.beta must be finite and > 0, got inf"),
        ({"beta": math.nan}, "loss.beta must be finite and > 0, got nan"),
        ({"type": "sigmoid,ipo", "weights": "1,nan"}, "loss.weights must be finite and >= 0"),
        ({"type": "sigmoid,ipo", "weights": "1,-0.5"}, "loss.weights must be finite and >= 0"),
        ({"sft_weight": math.nan}, "loss.sft_weight must be finite and >= 0, got nan"),
        ({"chosen_floor": math.nan}, "loss.chosen_floor must be finite and >= 0, got nan"),
        ({"type": "exo_pair"}, "loss.label_smoothing must be > 0 for exo_pair"),
        ({"type": "aot", "wpo_unaligned": True}, "per-pair weights do not apply to aot, aot_unpaired"),
        ({"type": "sigmoid", "sft_weight": 1.0, "objective": "per_draw"}, "per_draw needs .* not sft"),
        ({"type": "bco_pair_batch", "objective": "per_draw"}, "per_draw needs .* not bco_pair_batch"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(DsdpoError, match=message):
        LossConfig(**kwargs)


def test_per_pair_forms_are_allowed_per_draw():
    LossConfig("sigmoid,bco_pair", objective="per_draw", sft_weight=1.0, sft_per_response=True)


EIGHT = torch.full((8,), -10.0)


@pytest.mark.parametrize(
    ("scores", "extra", "message"),
    [
        ((EIGHT, EIGHT, EIGHT[:, None], EIGHT), {}, r"ref_chosen has shape \[8, 1\], not \[8\]"),
        ((EIGHT[:0],) * 4, {}, r"shape \[P\] with P >= 1, got \[0\]"),
        (
            (EIGHT[:1], EIGHT[:1], EIGHT[:1], EIGHT[:1]),
            {"preference_prob": torch.tensor([1.7])},
            r"in \[0, 1\]",
        ),
        (
            (EIGHT[:1], EIGHT[:1], EIGHT[:1], EIGHT[:1]),
            {"preference_prob": torch.tensor([math.nan])},
            r"in \[0, 1\]",
        ),
        (
            (EIGHT[:1],) * 4,
            {"chosen_lengths": torch.tensor([0.0]), "rejected_lengths": torch.tensor([1.0])},
            ">= 1",
        ),
    ],
)
def test_bad_inputs_are_refused(scores, extra, message):
    config = LossConfig("soft") if "preference_prob" in extra else LossConfig()
    with pytest.raises(DsdpoError, match=message):
        preference_loss(*scores, config, **extra)
