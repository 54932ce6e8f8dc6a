"""Preference losses on sequence scores: pure functions of tensors.

Inputs are the scores (ELBO estimates B̂, or any log-likelihoods) of each pair's chosen (w) and
rejected (l) response under the policy θ and the reference, all of shape [P], and the response
lengths |y| (tokens). With the log-ratios r_w = B̂_θ(y_w) − B̂_ref(y_w), r_l likewise (reference-free:
B̂_ref := 0), the f-scores f_w = f'(r_w), f_l = f'(r_l) of the f-divergence (below) and z = f_w − f_l:

    sigmoid        −log σ(βz)                                       DPO (Rafailov et al. 2023, eq. 7)
    ipo            (f_w/|y_w| − f_l/|y_l| − 1/(2β))²                IPO (Azar et al. 2023, eq. 17), per token
    ipo_sum        (z − 1/(2β))²                                    IPO eq. 17 on summed scores
    hinge          max(0, 1 − βz)                                   SLiC-HF (Zhao et al. 2023)
    cdpo           −(1−ε) log σ(βz) − ε log σ(−βz)                  conservative DPO, label smoothing ε
    robust         (−(1−ε) log σ(βz) + ε log σ(−βz)) / (1 − 2ε)     rDPO (Chowdhury et al. 2024, eq. 9)
    soft           −p log σ(βz) − (1−p) log σ(−βz)                  per-pair probability p that y_w ≻ y_l
    exo_pair       σ(βz)(log σ(βz) − log(1−ε)) + σ(−βz)(log σ(−βz) − log ε)  EXO (Ji et al. 2024, eq 16), ε>0
    sigmoid_norm   −log σ(β(f_w/|y_w| − f_l/|y_l|))                 DPO on per-token scores
    apo_zero       (1 − σ(βr_w)) + σ(βr_l)                          APO (D'Oosterlinck et al. 2024, eq. 7)
    apo_down       σ(βr_w) + (1 − σ(β(r_w − r_l)))                  APO (eq. 8)
    nca_pair       −log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)    NCA (Chen et al. 2024)
    bco_pair       −log σ(βr_w) − log σ(−βr_l)                      BCO (Jung et al. 2024) without its δ
    bco_pair_batch −log σ(βr_w − δ) − log σ(−(βr_l − δ)), δ the micro-batch's mean reward (no gradient)
    sppo_hard      (r_w − 1/(2β))² + (r_l + 1/(2β))²                SPPO hard labels (Wu et al. 2024, eq 4.7)
    aot            sigmoid on sort(B̂_θ(y_w) − B̂_θ(y_l)) − sort(B̂_ref(y_w) − B̂_ref(y_l)), smoothed by ε
    aot_unpaired   sigmoid on sort(r_w) − sort(r_l), smoothed by ε  AOT (Melnyk et al. 2024)
    discopop       (1−m)·(−log σ(βz)) + m·e^(−βz), m = σ(βz/τ)       DiscoPOP (Chris Lu et al. 2024, eq. 5)
    sft            −Σ_pairs B̂_θ(y_w) / Σ_pairs |y_w|               the chosen NLL per token of the micro-batch

f-divergences (Wang et al. 2023, f-DPO), f'(r) of each side: reverse_kl r (DPO); forward_kl 1 − e^(−r);
js log 2 + log σ(r); alpha (1 − e^(−αr))/α (α → 0: reverse KL, α = 1: forward KL). They apply to the
losses of z and of the per-token f-scores (F_DIVERGENCE_LOSSES, TRL's list plus cdpo, soft, ipo_sum).

TRL. Where a name is one of TRL 1.16's loss types (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss)
the number is TRL's on the same scores and lengths (tests/test_loss_trl.py against TRL's own code,
tests/fixtures/trl/build.py): sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, f-divergences reverse_kl and forward_kl.
dsdpo's own names: ipo_sum (the IPO paper's equation as written; TRL's ipo divides by the lengths),
bco_pair_batch (the BCO paper's δ, estimated on the micro-batch; TRL's bco_pair has no δ), cdpo and soft
(no TRL type), js = TRL's js_divergence, alpha with α = TRL's alpha_divergence with
f_alpha_divergence_coef 1 − α. e^x is capped below inf (TRL caps alpha's exponent at 80 in fp32,
forward_kl's not at all): numbers differ only where TRL's overflow. Lengths must be ≥ 1 (TRL clamps
to 1). `sft` is TRL's mean over the micro-batch's chosen tokens; sft_per_response gives LLaDA's SFT
normalisation instead, the mean over pairs of −B̂_θ(y_w)/|y_w| (dsdpo.objective.sft).

Several types at once (MPO): "sigmoid,bco_pair" with weights, a weighted sum per pair (TRL's
loss_weights). On top of any loss: RPO's NLL term (Pang et al. 2024) sft_weight·sft (TRL: loss types
sigmoid,sft with weights 1,sft_weight); a floor under the chosen likelihood (after DPOP, Pal et al.
2024) chosen_floor·max(0, B̂_ref(y_w) − B̂_θ(y_w)), per token if chosen_floor_per_token (no TRL
counterpart); and wpo_unaligned: WPO's weight (Zhou et al. 2024, eq. 2) without its alignment term,
exp(B̂_θ(y_w)/|y_w| + B̂_θ(y_l)/|y_l|) capped at 1, no gradient through it. TRL's use_weighting also
subtracts log Σ_v p_v² of every token from its log-probability; a masked diffusion score has no
per-token distribution of the clean sequence to take it from, so dsdpo does not claim TRL's name.

The implicit rewards are βr_w and βr_l; metrics carry TRL's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dsdpo.errors import DsdpoError
from dsdpo.objective.loss_config import (  # noqa: F401 (re-exported: the settings of these losses)
    BATCH_LEVEL_LOSSES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    OBJECTIVES,
    SMOOTHED_LOSSES,
    SORTED_LOSSES,
    LossConfig,
)


@dataclass(frozen=True)
class PairTerms:
    """What a loss reads, per pair [P]."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor | None = None  # response tokens |y_w|, for the per-token forms
    rejected_lengths: Tensor | None = None
    preference_prob: Tensor | None = None

    @property
    def chosen_ratio(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def h(self) -> Tensor:
        return self.chosen_ratio - self.rejected_ratio

    def per_token(self, name: str) -> tuple[Tensor, Tensor]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise DsdpoError(f"{name} needs the response lengths of every pair")
        return self.chosen_lengths.to(self.policy_chosen), self.rejected_lengths.to(self.policy_chosen)

    def check(self) -> None:
        """Refuse what would otherwise broadcast or average silently into a wrong number."""
        shape = self.policy_chosen.shape
        if len(shape) != 1 or shape[0] == 0:
            raise DsdpoError(f"preference_loss: scores must have shape [P] with P >= 1, got {list(shape)}")
        for name in ("policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths",
                     "preference_prob"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise DsdpoError(f"preference_loss: {name} has shape {list(value.shape)}, not {list(shape)}")
        for name in ("chosen_lengths", "rejected_lengths"):
            value = getattr(self, name)
            if value is not None and not bool((value >= 1).all()):
                raise DsdpoError(f"preference_loss: {name} must be >= 1 token, got {value.tolist()}")
        p = self.preference_prob
        if p is not None and not bool(((p >= 0) & (p <= 1)).all()):
            raise DsdpoError(f"preference_loss: preference_prob must be in [0, 1], got {p.tolist()}")


def _cap_exp(x: Tensor) -> Tensor:
    """e^x without overflow to inf (older TRL's cap_exp): the exponent is capped at log(max float).
    TRL 1.16 clamps alpha_divergence's exponent at 80 (fp32) and leaves forward_kl's unclamped."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max)))


def _soft_sigmoid_loss(logits: Tensor, p: Tensor | float) -> Tensor:
    """Cross-entropy of σ(logits) against the label p: −p log σ(x) − (1−p) log σ(−x)."""
    return -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)


def _f_prime(ratio: Tensor, c: LossConfig) -> Tensor:
    """f'(r) of the f-divergence (module docstring), as TRL 1.16's chosen_scores / rejected_scores."""
    if c.f_divergence == "reverse_kl":
        return ratio
    if c.f_divergence == "js":
        return math.log(2) + F.logsigmoid(ratio)
    alpha = 1.0 if c.f_divergence == "forward_kl" else c.f_alpha
    return (1 - _cap_exp(-alpha * ratio)) / alpha


def _f_scores(t: PairTerms, c: LossConfig) -> tuple[Tensor, Tensor]:
    return _f_prime(t.chosen_ratio, c), _f_prime(t.rejected_ratio, c)


def _f_logits(t: PairTerms, c: LossConfig) -> Tensor:
    """z of the module docstring: f_w − f_l."""
    chosen, rejected = _f_scores(t, c)
    return chosen - rejected


def _f_logits_per_token(t: PairTerms, c: LossConfig, name: str) -> Tensor:
    """f_w/|y_w| − f_l/|y_l|: TRL's ipo and sigmoid_norm divide each side's f-score by its length."""
    chosen, rejected = _f_scores(t, c)
    chosen_len, rejected_len = t.per_token(name)
    return chosen / chosen_len - rejected / rejected_len


def _sigmoid(t, c):
    return -F.logsigmoid(c.beta * _f_logits(t, c))


def _ipo(t, c):
    return (_f_logits_per_token(t, c, "ipo") - 1 / (2 * c.beta)) ** 2


def _ipo_sum(t, c):
    return (_f_logits(t, c) - 1 / (2 * c.beta)) ** 2


def _hinge(t, c):
    return torch.relu(1 - c.beta * _f_logits(t, c))


def _cdpo(t, c):
    return _soft_sigmoid_loss(c.beta * _f_logits(t, c), 1 - c.label_smoothing)


def _robust(t, c):
    z, eps = c.beta * _f_logits(t, c), c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _soft(t, c):
    if t.preference_prob is None:
        raise DsdpoError("loss.type 'soft' needs a preference_prob for every pair in the data")
    return _soft_sigmoid_loss(c.beta * _f_logits(t, c), t.preference_prob.to(t.policy_chosen))


def _exo_pair(t, c):
    z, eps = c.beta * _f_logits(t, c), c.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _sigmoid_norm(t, c):
    return -F.logsigmoid(c.beta * _f_logits_per_token(t, c, "sigmoid_norm"))


def _apo_zero(t, c):
    return (1 - torch.sigmoid(c.beta * t.chosen_ratio)) + torch.sigmoid(c.beta * t.rejected_ratio)


def _apo_down(t, c):
    return torch.sigmoid(c.beta * t.chosen_ratio) + (1 - torch.sigmoid(c.beta * t.h))


def _nca_pair(t, c):
    chosen, rejected = c.beta * t.chosen_ratio, c.beta * t.rejected_ratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(t, c):
    return -F.logsigmoid(c.beta * t.chosen_ratio) - F.logsigmoid(-c.beta * t.rejected_ratio)


def _bco_pair_batch(t, c):
    # BCO's δ (Jung et al. 2024) is a running mean of the rewards; a constant of the step, so no
    # gradient flows through it. Here it is the micro-batch's mean (no state to checkpoint).
    chosen, rejected = c.beta * t.chosen_ratio, c.beta * t.rejected_ratio
    delta = torch.cat([chosen, rejected]).mean().detach()
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def _sppo_hard(t, c):
    return (t.chosen_ratio - 0.5 / c.beta) ** 2 + (t.rejected_ratio + 0.5 / c.beta) ** 2


def _smoothed_sigmoid(delta: Tensor, c) -> Tensor:
    return _soft_sigmoid_loss(c.beta * delta, 1 - c.label_smoothing)


def _aot(t, c):
    policy, _ = torch.sort(t.policy_chosen - t.policy_rejected)
    reference, _ = torch.sort(t.ref_chosen - t.ref_rejected)
    return _smoothed_sigmoid(policy - reference, c)


def _aot_unpaired(t, c):
    chosen, _ = torch.sort(t.chosen_ratio)
    rejected, _ = torch.sort(t.rejected_ratio)
    return _smoothed_sigmoid(chosen - rejected, c)


def _discopop(t, c):
    z = c.beta * _f_logits(t, c)
    modulation = torch.sigmoid(z / c.discopop_tau)
    # e^(−z)·σ(z/τ) as one exponent: the product is inf·0 = NaN at z < −88.7 in fp32.
    exponential = torch.exp(-z + F.logsigmoid(z / c.discopop_tau))
    return -F.logsigmoid(z) * (1 - modulation) + exponential


def sft_losses(chosen: Tensor, chosen_lengths: Tensor, per_response: bool) -> Tensor:
    """The chosen side's NLL per token, per pair [P]: TRL's −Σ B̂/Σ|y| of the micro-batch, the same
    number for every pair (TRL's sft), or −B̂/|y| of each (per_response: LLaDA's SFT, Nie et al. 2025).
    Both are linear in the scores, so a chunk of draws can backprop its own share (dsdpo.objective.sft)."""
    if per_response:
        return -chosen / chosen_lengths
    return (-chosen.sum() / chosen_lengths.sum()).expand(chosen.shape)


def _sft(t, c):
    chosen_len, _ = t.per_token("sft")
    return sft_losses(t.policy_chosen, chosen_len, c.sft_per_response)


LOSSES: dict[str, Callable[[PairTerms, LossConfig], Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "ipo_sum": _ipo_sum,
    "hinge": _hinge,
    "cdpo": _cdpo,
    "robust": _robust,
    "soft": _soft,
    "exo_pair": _exo_pair,
    "sigmoid_norm": _sigmoid_norm,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "bco_pair_batch": _bco_pair_batch,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "discopop": _discopop,
    "sft": _sft,
}
if tuple(LOSSES) != LOSS_TYPES:  # the names the settings offer (dsdpo.objective.loss_config) are these losses
    raise ImportError(
        f"dsdpo.objective.loss_config.LOSS_TYPES {LOSS_TYPES} differ from the losses {tuple(LOSSES)}"
    )


@dataclass
class LossOutput:
    losses: Tensor  # [P] per-pair loss
    chosen_rewards: Tensor  # [P] β(B̂_θ(y_w) − B̂_ref(y_w))
    rejected_rewards: Tensor  # [P]
    beta: float = 1.0

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    def metrics(self, policy_chosen: Tensor, policy_rejected: Tensor) -> dict[str, float]:
        """Batch means under TRL's names (rewards/*, logps/*)."""
        chosen, rejected = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        return {
            "loss": float(self.losses.detach().mean()),
            # Drift of each side's score from the reference, in nats (the rewards without β): both
            # falling while the margin grows is likelihood displacement (dsdpo.training.metrics).
            "drift/chosen": float((chosen / self.beta).mean()),
            "drift/rejected": float((rejected / self.beta).mean()),
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
            "logps/chosen": float(policy_chosen.detach().mean()),
            "logps/rejected": float(policy_rejected.detach().mean()),
        }


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    config: LossConfig = LossConfig(),  # noqa: B008 (a frozen dataclass)
    preference_prob: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Per-pair losses and implicit rewards (formulas in the module docstring)."""
    if config.reference_free or ref_chosen is None or ref_rejected is None:
        if not config.reference_free:
            raise DsdpoError("reference scores are missing; set loss.reference_free to train without them")
        ref_chosen = ref_rejected = torch.zeros_like(policy_chosen)
    terms = PairTerms(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths,
        rejected_lengths,
        preference_prob,
    )
    terms.check()
    weighted = zip(config.types, config.type_weights, strict=True)
    losses = sum(weight * LOSSES[name](terms, config) for name, weight in weighted)
    if config.wpo_unaligned:
        chosen_len, rejected_len = terms.per_token("loss.wpo_unaligned")
        weight = torch.exp(policy_chosen / chosen_len + policy_rejected / rejected_len).clamp(max=1)
        losses = losses * weight.detach()
    if config.sft_weight:
        losses = losses + config.sft_weight * _sft(terms, config)
    if config.chosen_floor:
        gap = torch.relu(ref_chosen - policy_chosen)
        if config.chosen_floor_per_token:
            gap = gap / terms.per_token("loss.chosen_floor_per_token")[0]
        losses = losses + config.chosen_floor * gap
    return LossOutput(
        losses=losses,
        chosen_rewards=config.beta * terms.chosen_ratio.detach(),
        rejected_rewards=config.beta * terms.rejected_ratio.detach(),
        beta=config.beta,
    )
