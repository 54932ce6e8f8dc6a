"""Preference losses on sequence scores: pure functions of tensors.

Inputs are the scores (ELBO estimates B̂, or any log-likelihoods) of each pair's chosen (w) and
rejected (l) response under the policy θ and the reference, all of shape [P]. With

    h = (B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))        (reference-free: B̂_ref := 0)

each loss is a function of h per pair:

    sigmoid  −log σ(βh)                                        DPO (Rafailov et al. 2023, eq. 7)
    ipo      (h − 1/(2β))²                                     IPO (Azar et al. 2023, eq. 17)
    hinge    max(0, 1 − βh)                                    SLiC-HF (Zhao et al. 2023)
    cdpo     −(1−ε) log σ(βh) − ε log σ(−βh)                   conservative DPO, label smoothing ε
    robust   (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)      rDPO (Chowdhury et al. 2024, eq. 9)
    soft     −p log σ(βh) − (1−p) log σ(−βh)                   per-pair probability p that y_w ≻ y_l

The implicit rewards are r_w = β(B̂_θ(y_w) − B̂_ref(y_w)) and r_l likewise; metrics carry TRL's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dsdpo.errors import DsdpoError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "cdpo", "robust", "soft")


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss, and its parameters. Validates itself; errors name the field."""

    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # ε of cdpo and robust
    reference_free: bool = False

    def __post_init__(self):
        if self.type not in LOSS_TYPES:
            raise DsdpoError(f"loss.type: unknown loss {self.type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise DsdpoError(f"loss.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DsdpoError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.type not in ("cdpo", "robust"):
            raise DsdpoError(f"loss.label_smoothing is used by cdpo and robust only, not {self.type!r}")


@dataclass
class LossOutput:
    losses: Tensor  # [P] per-pair loss
    chosen_rewards: Tensor  # [P] β(B̂_θ(y_w) − B̂_ref(y_w))
    rejected_rewards: Tensor  # [P]

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    def metrics(self, policy_chosen: Tensor, policy_rejected: Tensor) -> dict[str, float]:
        """Batch means under TRL's names (rewards/*, logps/*)."""
        chosen, rejected = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        return {
            "loss": float(self.losses.detach().mean()),
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
            "logps/chosen": float(policy_chosen.detach().mean()),
            "logps/rejected": float(policy_rejected.detach().mean()),
        }


def _soft_sigmoid_loss(logits: Tensor, p: Tensor | float) -> Tensor:
    """Cross-entropy of σ(logits) against the label p: −p log σ(x) − (1−p) log σ(−x)."""
    return -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    config: LossConfig = LossConfig(),
    preference_prob: Tensor | None = None,
) -> LossOutput:
    """Per-pair losses and implicit rewards (formulas in the module docstring)."""
    if config.reference_free or ref_chosen is None or ref_rejected is None:
        if not config.reference_free:
            raise DsdpoError("reference scores are missing; set loss.reference_free to train without them")
        ref_chosen = ref_rejected = torch.zeros_like(policy_chosen)
    chosen_log_ratio = policy_chosen - ref_chosen
    rejected_log_ratio = policy_rejected - ref_rejected
    h = chosen_log_ratio - rejected_log_ratio
    beta, eps = config.beta, config.label_smoothing

    if config.type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif config.type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif config.type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif config.type == "cdpo":
        losses = _soft_sigmoid_loss(beta * h, 1 - eps)
    elif config.type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:  # soft
        if preference_prob is None:
            raise DsdpoError("loss.type 'soft' needs a preference_prob for every pair in the data")
        losses = _soft_sigmoid_loss(beta * h, preference_prob.to(h))

    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_log_ratio.detach(),
        rejected_rewards=beta * rejected_log_ratio.detach(),
    )
