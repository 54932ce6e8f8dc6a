"""Preference losses on sequence scores: pure functions of tensors.

Inputs are the scores (ELBO estimates B̂, or any log-likelihoods) of each pair's chosen (w) and
rejected (l) response under the policy θ and the reference, all of shape [P]. With the log-ratios
r_w = B̂_θ(y_w) − B̂_ref(y_w), r_l likewise (reference-free: B̂_ref := 0), and h = r_w − r_l:

    sigmoid      −log σ(βz)                                     DPO (Rafailov et al. 2023, eq. 7)
    ipo          (z − 1/(2β))²                                  IPO (Azar et al. 2023, eq. 17; unnormalised)
    hinge        max(0, 1 − βz)                                 SLiC-HF (Zhao et al. 2023)
    cdpo         −(1−ε) log σ(βz) − ε log σ(−βz)                conservative DPO, label smoothing ε
    robust       (−(1−ε) log σ(βz) + ε log σ(−βz)) / (1 − 2ε)   rDPO (Chowdhury et al. 2024, eq. 9)
    soft         −p log σ(βz) − (1−p) log σ(−βz)                per-pair probability p that y_w ≻ y_l
    exo_pair     σ(βz)(log σ(βz) − log(1−ε)) + σ(−βz)(log σ(−βz) − log ε)   EXO (Ji et al. 2024, eq. 16)
    sigmoid_norm −log σ(β h̄), h̄ = r_w/|y_w| − r_l/|y_l|        DPO on length-normalised scores
    apo_zero     (1 − σ(βr_w)) + σ(βr_l)                        APO (D'Oosterlinck et al. 2024, eq. 7)
    apo_down     σ(βr_w) + (1 − σ(β(r_w − r_l)))                APO (eq. 8)
    nca_pair     −log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)  NCA (Chen et al. 2024)
    bco_pair     −log σ(βr_w − δ) − log σ(−(βr_l − δ)), δ the mean reward   BCO (Jung et al. 2024)
    sppo_hard    (r_w − 1/(2β))² + (r_l + 1/(2β))²              SPPO, hard labels (Wu et al. 2024, eq. 4.7)
    aot          sigmoid on sort(B̂_θ(y_w) − B̂_θ(y_l)) − sort(B̂_ref(y_w) − B̂_ref(y_l))   AOT, paired
    aot_unpaired sigmoid on sort(r_w) − sort(r_l)               AOT (Melnyk et al. 2024), unpaired
    discopop     (1−m)·(−log σ(βh)) + m·e^(−βh), m = σ(βh/τ)     DiscoPOP (Chris Lu et al. 2024, eq. 5)
    sft          −B̂_θ(y_w)/|y_w|                                the chosen response's NLL per token

z is h under the reverse KL (DPO); an f-divergence (Wang et al. 2023, f-DPO) replaces it for the
losses of z: JS z = h − (softplus(r_w) − softplus(r_l)); α-divergence z = (e^(−αr_l) − e^(−αr_w))/α,
forward KL being α = 1. The formulas follow TRL 1.16's DPOTrainer where it has the type (aot_unpaired
is TRL's "aot_pair"); bco_pair's δ is the mean reward of the micro-batch, where TRL keeps a running
mean across steps (a state that would need checkpointing; see the closing note of the change).

Several types at once (MPO): "sigmoid,bco_pair" with weights, a weighted sum per pair. On top of any
loss: WPO's weight (Zhou et al. 2024, eq. 2) exp(B̂_θ(y_w)/|y_w| + B̂_θ(y_l)/|y_l|) capped at 1 (the
ELBO per token stands in for the mean token log-probability; no gradient through it), RPO's NLL term
(Pang et al. 2024) sft_weight·(−B̂_θ(y_w)/|y_w|), and a floor under the chosen likelihood (after
DPOP, Pal et al. 2024) chosen_floor·max(0, B̂_ref(y_w) − B̂_θ(y_w)), per token if chosen_floor_per_token.

The implicit rewards are βr_w and βr_l; metrics carry TRL's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dsdpo.errors import DsdpoError


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


def _cap_exp(x: Tensor) -> Tensor:
    """e^x without overflow to inf (TRL's cap_exp): the exponent is capped at log(max float)."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max)))


def _soft_sigmoid_loss(logits: Tensor, p: Tensor | float) -> Tensor:
    """Cross-entropy of σ(logits) against the label p: −p log σ(x) − (1−p) log σ(−x)."""
    return -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)


def _f_logits(t: PairTerms, c: LossConfig) -> Tensor:
    """z of the module docstring: h under the chosen f-divergence."""
    if c.f_divergence == "reverse_kl":
        return t.h
    if c.f_divergence == "js":
        return t.h - (F.softplus(t.chosen_ratio) - F.softplus(t.rejected_ratio))
    alpha = 1.0 if c.f_divergence == "forward_kl" else c.f_alpha
    return (_cap_exp(-alpha * t.rejected_ratio) - _cap_exp(-alpha * t.chosen_ratio)) / alpha


def _sigmoid(t, c):
    return -F.logsigmoid(c.beta * _f_logits(t, c))


def _ipo(t, c):
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
    return _soft_sigmoid_loss(c.beta * _f_logits(t, c), t.preference_prob.to(t.h))


def _exo_pair(t, c):
    z, eps = c.beta * _f_logits(t, c), c.label_smoothing or 1e-3  # TRL's default ε
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _sigmoid_norm(t, c):
    chosen_len, rejected_len = t.per_token("sigmoid_norm")
    return -F.logsigmoid(c.beta * (t.chosen_ratio / chosen_len - t.rejected_ratio / rejected_len))


def _apo_zero(t, c):
    return (1 - torch.sigmoid(c.beta * t.chosen_ratio)) + torch.sigmoid(c.beta * t.rejected_ratio)


def _apo_down(t, c):
    return torch.sigmoid(c.beta * t.chosen_ratio) + (1 - torch.sigmoid(c.beta * t.h))


def _nca_pair(t, c):
    chosen, rejected = c.beta * t.chosen_ratio, c.beta * t.rejected_ratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(t, c):
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
    z = c.beta * t.h
    modulation = torch.sigmoid(z / c.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def _sft(t, c):
    chosen_len, _ = t.per_token("sft")
    return -t.policy_chosen / chosen_len


LOSSES: dict[str, Callable[[PairTerms, LossConfig], Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
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
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "discopop": _discopop,
    "sft": _sft,
}
LOSS_TYPES = tuple(LOSSES)
# The losses that are functions of z (an f-divergence applies to them), and those that use ε.
F_DIVERGENCE_LOSSES = ("sigmoid", "ipo", "hinge", "cdpo", "robust", "soft", "exo_pair")
SMOOTHED_LOSSES = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# Losses that compare pairs with each other (sorting, a mean reward): not a per-draw objective.
BATCH_LEVEL_LOSSES = ("aot", "aot_unpaired", "bco_pair")
OBJECTIVES = ("sequence", "per_draw")


def _setting(default, help: str, *, flag: str | None = None, choices=None):
    """A field with its command-line help (as dsdpo.config.setting; dsdpo.config imports this module)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss, and its parameters. Validates itself; errors name the field."""

    type: str = _setting(
        "sigmoid",
        f"one of {', '.join(LOSS_TYPES)}, or several comma-separated (with --loss-weights); sigmoid is "
        "DPO; formulas in dsdpo/loss.py",
        flag="--loss",
    )
    beta: float = _setting(0.1, "DPO beta")
    label_smoothing: float = _setting(0.0, f"epsilon of {', '.join(SMOOTHED_LOSSES)}")
    reference_free: bool = _setting(False, "no reference model")
    weights: str = _setting(
        "", "comma-separated weight of each --loss type (default 1 each)", flag="--loss-weights"
    )
    f_divergence: str = _setting("reverse_kl", "divergence of f-DPO (reverse_kl: DPO)", choices=F_DIVERGENCES)
    f_alpha: float = _setting(1.0, "alpha of --f-divergence alpha")
    discopop_tau: float = _setting(0.05, "tau of the discopop loss")
    wpo: bool = _setting(False, "weight pairs by WPO's policy-probability weight")
    sft_weight: float = _setting(0.0, "RPO: add this times the chosen NLL per token")
    chosen_floor: float = _setting(
        0.0, "add lambda * max(0, B_ref(chosen) - B_policy(chosen)): keeps the chosen likelihood up"
    )
    chosen_floor_per_token: bool = _setting(False, "the floor's gap per token")
    # per_draw: Diffusion-DPO's mean over draws k of the loss of the draw-k terms (dsdpo.gradient).
    objective: str = _setting(
        "sequence",
        "sequence: the loss of the Monte Carlo scores; per_draw: Diffusion-DPO's mean of the per-draw "
        "losses (an upper bound, one pass with gradients)",
        choices=OBJECTIVES,
    )

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.type.split(","))

    @property
    def supervised(self) -> bool:
        """`--loss sft` alone: SFT on completions (dsdpo.sft), no rejected side and no reference."""
        return self.types == ("sft",) and not (self.sft_weight or self.chosen_floor)

    @property
    def type_weights(self) -> tuple[float, ...]:
        if not self.weights:
            return (1.0,) * len(self.types)
        return tuple(float(w) for w in self.weights.split(","))

    def __post_init__(self):
        for name in self.types:
            if name not in LOSSES:
                raise DsdpoError(f"loss.type: unknown loss {name!r}; choose from {', '.join(LOSS_TYPES)}")
        try:
            weights = self.type_weights
        except ValueError as err:
            raise DsdpoError(f"loss.weights: not comma-separated numbers: {self.weights!r}") from err
        if len(weights) != len(self.types):
            raise DsdpoError(f"loss.weights: {len(weights)} weights for {len(self.types)} loss types")
        if not self.beta > 0:
            raise DsdpoError(f"loss.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DsdpoError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not set(self.types) & set(SMOOTHED_LOSSES):
            raise DsdpoError(
                f"loss.label_smoothing is used by {', '.join(SMOOTHED_LOSSES)} only, not {self.type!r}"
            )
        if self.f_divergence not in F_DIVERGENCES:
            raise DsdpoError(f"loss.f_divergence: unknown {self.f_divergence!r}; choose from {F_DIVERGENCES}")
        if self.f_divergence != "reverse_kl" and set(self.types) - set(F_DIVERGENCE_LOSSES):
            raise DsdpoError(
                f"loss.f_divergence {self.f_divergence!r} applies to {', '.join(F_DIVERGENCE_LOSSES)} only"
            )
        if self.f_divergence == "alpha" and not self.f_alpha > 0:
            raise DsdpoError(f"loss.f_alpha must be positive, got {self.f_alpha}")
        if not self.discopop_tau > 0:
            raise DsdpoError(f"loss.discopop_tau must be positive, got {self.discopop_tau}")
        if self.objective not in OBJECTIVES:
            raise DsdpoError(f"loss.objective: unknown {self.objective!r}; choose from {OBJECTIVES}")
        if self.objective == "per_draw" and set(self.types) & set(BATCH_LEVEL_LOSSES):
            raise DsdpoError(
                f"loss.objective per_draw needs a loss of each pair alone, not {self.type!r} "
                f"({', '.join(BATCH_LEVEL_LOSSES)} compare pairs with each other)"
            )
        for name in ("sft_weight", "chosen_floor"):
            if getattr(self, name) < 0:
                raise DsdpoError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


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
            # falling while the margin grows is likelihood displacement (dsdpo.metrics).
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
    config: LossConfig = LossConfig(),
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
    weighted = zip(config.types, config.type_weights, strict=True)
    losses = sum(weight * LOSSES[name](terms, config) for name, weight in weighted)
    if config.wpo:
        chosen_len, rejected_len = terms.per_token("loss.wpo")
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
