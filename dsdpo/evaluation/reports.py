"""Preference evaluation, likelihood scores and base-versus-tuned comparison of masked diffusion LMs.

    scores = score_pairs(model, pairs, mask_token_id=m, pad_token_id=p, settings=ScoreSettings(budget=8))
    report = evaluate_preference(policy, reference, pairs, mask_token_id=m, pad_token_id=p)
    comparison = compare_preference(base, tuned, pairs, mask_token_id=m, pad_token_id=p)

Every response is scored with `settings.budget` keyed draws (dsdpo.objective.draws), keyed exactly as training
keys them (`dsdpo.objective.draws.pair_draws`): two models scored with the same settings see the same
masks, so the shared noise cancels in their difference (antithetic, docs/design.md, "VRPO").

Standard errors. A score is B̂ = (1/n) Σ_k f_k; its standard error is estimated as std_k(f_k)/sqrt(n)
(sample std, n−1). With stratified draws (VRPO) this treats the strata as independent draws and so
overstates the error a little: it is an upper estimate. The error of B̂_θ − B̂_ref uses the per-draw
differences f_k^θ − f_k^ref on the shared draws, which is where antithetic sampling shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError
from dsdpo.objective.elbo import standard_error
from dsdpo.objective.losses import LossConfig, preference_loss
from dsdpo.objective.scoring import PairScores, ScoreSettings, score_pairs

# Re-exported: the scores evaluation reads are computed by dsdpo.objective.scoring, shared with training.
__all__ = [
    "PairScores",
    "PreferenceComparison",
    "PreferenceReport",
    "ScoreSettings",
    "compare_preference",
    "compare_scores",
    "evaluate_preference",
    "preference_report",
    "score_pairs",
]

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
DEFAULT_SETTINGS = ScoreSettings()


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class PreferenceReport:
    """Preference metrics over a data set; the means are over pairs (TRL's names in `trl_metrics`)."""

    num_pairs: int
    budget: int
    estimator: str
    loss_type: str
    beta: float
    reference_free: bool
    loss: float
    reward_accuracy: float  # fraction of pairs with chosen reward > rejected reward (ties count as wrong)
    reward_margin: float  # mean of r_w − r_l
    chosen_reward: float  # mean of r_w = β(B̂_θ(y_w) − B̂_ref(y_w))
    rejected_reward: float
    policy_chosen_elbo: float
    policy_rejected_elbo: float
    score_std_error: float | None  # mean over responses of the policy score's standard error
    ratio_std_error: float | None  # mean over responses of the std error of B̂_θ − B̂_ref (shared draws)

    def as_dict(self) -> dict:
        return asdict(self)

    def trl_metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "rewards/chosen": self.chosen_reward,
            "rewards/rejected": self.rejected_reward,
            "rewards/margins": self.reward_margin,
            "rewards/accuracies": self.reward_accuracy,
            "logps/chosen": self.policy_chosen_elbo,
            "logps/rejected": self.policy_rejected_elbo,
        }

    def table(self) -> str:
        rows = [
            ("pairs", str(self.num_pairs)),
            ("draws per response", f"{self.budget} ({self.estimator})"),
            ("loss", f"{self.loss:.6f} ({self.loss_type}, beta {self.beta:g})"),
            ("reward accuracy", f"{self.reward_accuracy:.4f}"),
            ("reward margin", f"{self.reward_margin:.6f}"),
            ("chosen reward", f"{self.chosen_reward:.6f}"),
            ("rejected reward", f"{self.rejected_reward:.6f}"),
            ("policy ELBO chosen", f"{self.policy_chosen_elbo:.4f}"),
            ("policy ELBO rejected", f"{self.policy_rejected_elbo:.4f}"),
            ("score std error", _fmt(self.score_std_error)),
            (
                "policy-ref std error",
                "n/a (reference-free)" if self.reference_free else _fmt(self.ratio_std_error),
            ),
        ]
        return format_table(rows)


def _fmt(value: float | None) -> str:
    return "n/a (budget 1)" if value is None else f"{value:.4f}"


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns: names left-justified, values after them."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def preference_report(
    policy: PairScores,
    reference: PairScores | None,
    loss_config: LossConfig,
    settings: ScoreSettings,
) -> PreferenceReport:
    """The metrics of policy scores against reference scores made on the same draws."""
    if reference is None:
        loss_config = replace(loss_config, reference_free=True)
    elif (
        reference.example_ids != policy.example_ids
        or reference.chosen_terms.shape != policy.chosen_terms.shape
    ):
        raise DsdpoError("policy and reference scores are not of the same pairs and draws")
    out = preference_loss(
        policy.chosen,
        policy.rejected,
        None if reference is None else reference.chosen,
        None if reference is None else reference.rejected,
        loss_config,
        preference_prob=policy.preference_prob,
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
    )
    metrics = out.metrics(policy.chosen, policy.rejected)
    policy_se = torch.cat([policy.chosen_std_error, policy.rejected_std_error])
    if reference is None:
        ratio_se = policy_se
    else:
        ratio_se = torch.cat(
            [
                standard_error(policy.chosen_terms - reference.chosen_terms),
                standard_error(policy.rejected_terms - reference.rejected_terms),
            ]
        )
    return PreferenceReport(
        num_pairs=len(policy.example_ids),
        budget=settings.budget,
        estimator=settings.estimator,
        loss_type=loss_config.type,
        beta=loss_config.beta,
        reference_free=reference is None,
        loss=metrics["loss"],
        reward_accuracy=metrics["rewards/accuracies"],
        reward_margin=metrics["rewards/margins"],
        chosen_reward=metrics["rewards/chosen"],
        rejected_reward=metrics["rewards/rejected"],
        policy_chosen_elbo=metrics["logps/chosen"],
        policy_rejected_elbo=metrics["logps/rejected"],
        score_std_error=_nan_to_none(float(policy_se.mean())),
        ratio_std_error=_nan_to_none(float(ratio_se.mean())),
    )


def evaluate_preference(
    policy: nn.Module,
    reference: nn.Module | None,
    pairs: Sequence[TokenizedPair],
    *,
    mask_token_id: int,
    pad_token_id: int,
    loss: LossConfig | None = None,
    settings: ScoreSettings = DEFAULT_SETTINGS,
) -> PreferenceReport:
    """Reward accuracy, margins, rewards, loss and standard errors of `policy` against `reference`.

    Both are scored on the same keyed draws. No reference: reference-free (B̂_ref := 0).
    """
    kwargs = dict(mask_token_id=mask_token_id, pad_token_id=pad_token_id, settings=settings)
    policy_scores = score_pairs(policy, pairs, desc="policy", **kwargs)
    reference_scores = (
        None if reference is None else score_pairs(reference, pairs, desc="reference", **kwargs)
    )
    return preference_report(policy_scores, reference_scores, loss or LossConfig(), settings)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences (tuned − base) over items, with a 95% normal-approximation interval."""

    mean: float
    std_error: float | None
    ci95_low: float | None
    ci95_high: float | None
    n: int

    @classmethod
    def of(cls, differences: Tensor) -> PairedDifference:
        """mean ± z·sd/sqrt(N) with the sample sd (N−1) of the per-item differences; no interval for N < 2."""
        n = differences.numel()
        mean = float(differences.double().mean())
        if n < 2:
            return cls(mean, None, None, None, n)
        se = float(differences.double().std(correction=1)) / math.sqrt(n)
        return cls(mean, se, mean - Z_95 * se, mean + Z_95 * se, n)

    def as_text(self, digits: int = 4) -> str:
        if self.ci95_low is None:
            return f"{self.mean:+.{digits}f} (no interval: one item)"
        return f"{self.mean:+.{digits}f}  95% CI [{self.ci95_low:+.{digits}f}, {self.ci95_high:+.{digits}f}]"


@dataclass(frozen=True)
class PreferenceComparison:
    """Base versus tuned on the same pairs and draws. Gap = B̂(y_w) − B̂(y_l) of a pair under a model."""

    num_pairs: int
    budget: int
    estimator: str
    beta: float
    base_accuracy: float  # fraction of pairs whose gap is > 0
    tuned_accuracy: float
    base_gap: float  # mean gap
    tuned_gap: float
    accuracy_difference: PairedDifference  # of 1[gap_tuned > 0] − 1[gap_base > 0]
    gap_difference: PairedDifference  # of gap_tuned − gap_base
    margin: PairedDifference  # β(gap_tuned − gap_base): the DPO reward margin of tuned with base as reference

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        return format_table(
            [
                ("pairs", str(self.num_pairs)),
                ("draws per response", f"{self.budget} ({self.estimator})"),
                ("accuracy base", f"{self.base_accuracy:.4f}"),
                ("accuracy tuned", f"{self.tuned_accuracy:.4f}"),
                ("accuracy tuned-base", self.accuracy_difference.as_text()),
                ("gap base", f"{self.base_gap:.4f}"),
                ("gap tuned", f"{self.tuned_gap:.4f}"),
                ("gap tuned-base", self.gap_difference.as_text()),
                (f"margin (beta {self.beta:g})", self.margin.as_text(6)),
            ]
        )


def compare_scores(base: PairScores, tuned: PairScores, settings: ScoreSettings, beta: float = 0.1):
    """Paired comparison of two models' scores of the same pairs on the same draws."""
    if base.example_ids != tuned.example_ids or base.chosen_terms.shape != tuned.chosen_terms.shape:
        raise DsdpoError("base and tuned scores are not of the same pairs and draws")
    base_gap, tuned_gap = base.chosen - base.rejected, tuned.chosen - tuned.rejected
    base_right, tuned_right = (base_gap > 0).double(), (tuned_gap > 0).double()
    return PreferenceComparison(
        num_pairs=len(base.example_ids),
        budget=settings.budget,
        estimator=settings.estimator,
        beta=beta,
        base_accuracy=float(base_right.mean()),
        tuned_accuracy=float(tuned_right.mean()),
        base_gap=float(base_gap.mean()),
        tuned_gap=float(tuned_gap.mean()),
        accuracy_difference=PairedDifference.of(tuned_right - base_right),
        gap_difference=PairedDifference.of(tuned_gap - base_gap),
        margin=PairedDifference.of(beta * (tuned_gap - base_gap)),
    )


def compare_preference(
    base: nn.Module,
    tuned: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    mask_token_id: int,
    pad_token_id: int,
    settings: ScoreSettings = DEFAULT_SETTINGS,
    beta: float = 0.1,
) -> PreferenceComparison:
    """Score both models on the same draws and compare them pair by pair."""
    kwargs = dict(mask_token_id=mask_token_id, pad_token_id=pad_token_id, settings=settings)
    base_scores = score_pairs(base, pairs, desc="base", **kwargs)
    tuned_scores = score_pairs(tuned, pairs, desc="tuned", **kwargs)
    return compare_scores(base_scores, tuned_scores, settings, beta)
