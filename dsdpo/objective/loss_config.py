"""The preference loss's settings (LossConfig) and the names of the losses: importable without torch,
so that the command line is built without loading it. The losses themselves are in dsdpo.objective.losses,
which
checks that it implements exactly LOSS_TYPES."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsdpo.errors import DsdpoError
from dsdpo.settings import setting

# dsdpo.objective.losses.LOSSES implements each, in this order (formulas there and in docs/losses.md)
LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "ipo_sum",
    "hinge",
    "cdpo",
    "robust",
    "soft",
    "exo_pair",
    "sigmoid_norm",
    "apo_zero",
    "apo_down",
    "nca_pair",
    "bco_pair",
    "bco_pair_batch",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "discopop",
    "sft",
)
# The losses of f-scores (an f-divergence applies: TRL's list, then dsdpo's own), and those using ε.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCE_LOSSES += ("ipo_sum", "cdpo", "soft")
SMOOTHED_LOSSES = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# Losses that compare pairs with each other (sorting, a mean reward, a token count): not a per-draw
# objective. TRL's sft divides by the micro-batch's tokens; with sft_per_response it is per pair.
BATCH_LEVEL_LOSSES = ("aot", "aot_unpaired", "bco_pair_batch", "sft")
# WPO's per-pair weights would be misaligned with the losses of sorted pairs (TRL refuses them too).
SORTED_LOSSES = ("aot", "aot_unpaired")
OBJECTIVES = ("sequence", "per_draw")


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss, and its parameters. Validates itself; errors name the field."""

    type: str = setting(
        "sigmoid",
        f"one of {', '.join(LOSS_TYPES)}, or several comma-separated (with --loss-weights); sigmoid is "
        "DPO; TRL's names compute TRL 1.16's numbers; formulas, sources and TRL counterparts in "
        "docs/losses.md",
        flag="--loss",
    )
    beta: float = setting(0.1, "DPO beta")
    label_smoothing: float = setting(
        0.0, f"epsilon of {', '.join(SMOOTHED_LOSSES)} (exo_pair needs it > 0; EXO suggests 1e-3)"
    )
    reference_free: bool = setting(False, "no reference model")
    weights: str = setting(
        "", "comma-separated weight >= 0 of each --loss type (default 1 each)", flag="--loss-weights"
    )
    f_divergence: str = setting(
        "reverse_kl",
        "divergence of f-DPO (reverse_kl: DPO; js is TRL's js_divergence, alpha TRL's alpha_divergence "
        "with coefficient 1 - alpha)",
        choices=F_DIVERGENCES,
    )
    f_alpha: float = setting(1.0, "alpha of --f-divergence alpha (f-DPO's alpha; 1: forward KL)")
    discopop_tau: float = setting(0.05, "tau of the discopop loss")
    wpo_unaligned: bool = setting(
        False,
        "weight pairs by WPO's weight exp(B/|y_w| + B/|y_l|) without TRL's alignment term (not TRL's "
        "use_weighting; not with aot, aot_unpaired)",
    )
    sft_weight: float = setting(
        0.0, "RPO: add this times the sft loss (TRL: loss types sigmoid,sft, weights 1,this)"
    )
    sft_per_response: bool = setting(
        False,
        "LLaDA's SFT normalisation for the sft loss and RPO's term: the mean over pairs of each chosen "
        "NLL per token, instead of TRL's NLL per token of the micro-batch's chosen tokens",
    )
    chosen_floor: float = setting(
        0.0, "add lambda * max(0, B_ref(chosen) - B_policy(chosen)): keeps the chosen likelihood up"
    )
    chosen_floor_per_token: bool = setting(False, "the floor's gap per token")
    # per_draw: Diffusion-DPO's mean over draws k of the loss of the draw-k terms (dsdpo.objective.gradient).
    objective: str = setting(
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
        """`--loss sft` alone: SFT on completions (dsdpo.objective.sft), no rejected side and no reference."""
        return self.types == ("sft",) and not (self.sft_weight or self.chosen_floor)

    @property
    def type_weights(self) -> tuple[float, ...]:
        if not self.weights:
            return (1.0,) * len(self.types)
        return tuple(float(w) for w in self.weights.split(","))

    @property
    def batch_level(self) -> set[str]:
        """The terms in use that compare a micro-batch's pairs with each other."""
        used = set(self.types) | ({"sft"} if self.sft_weight else set())
        if self.sft_per_response:
            used.discard("sft")
        return used & set(BATCH_LEVEL_LOSSES)

    def __post_init__(self):
        for name in self.types:
            if name not in LOSS_TYPES:
                raise DsdpoError(f"loss.type: unknown loss {name!r}; choose from {', '.join(LOSS_TYPES)}")
        try:
            weights = self.type_weights
        except ValueError as err:
            raise DsdpoError(f"loss.weights: not comma-separated numbers: {self.weights!r}") from err
        if len(weights) != len(self.types):
            raise DsdpoError(f"loss.weights: {len(weights)} weights for {len(self.types)} loss types")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise DsdpoError(f"loss.weights must be finite and >= 0, got {self.weights!r}")
        for name in ("beta", "f_alpha", "discopop_tau"):
            _require_finite(name, getattr(self, name), positive=True)
        for name in ("sft_weight", "chosen_floor"):
            _require_finite(name, getattr(self, name), positive=False)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DsdpoError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not set(self.types) & set(SMOOTHED_LOSSES):
            raise DsdpoError(
                f"loss.label_smoothing is used by {', '.join(SMOOTHED_LOSSES)} only, not {self.type!r}"
            )
        if "exo_pair" in self.types and not self.label_smoothing:
            # log ε of EXO eq. 16 is −inf at 0; TRL 1.16 refuses it too.
            raise DsdpoError("loss.label_smoothing must be > 0 for exo_pair (the EXO paper suggests 1e-3)")
        if self.f_divergence not in F_DIVERGENCES:
            raise DsdpoError(f"loss.f_divergence: unknown {self.f_divergence!r}; choose from {F_DIVERGENCES}")
        if self.f_divergence != "reverse_kl" and set(self.types) - set(F_DIVERGENCE_LOSSES):
            raise DsdpoError(
                f"loss.f_divergence {self.f_divergence!r} applies to {', '.join(F_DIVERGENCE_LOSSES)} only"
            )
        if self.wpo_unaligned and set(self.types) & set(SORTED_LOSSES):
            raise DsdpoError(
                f"loss.wpo_unaligned: per-pair weights do not apply to {', '.join(SORTED_LOSSES)} "
            )
        if self.objective not in OBJECTIVES:
            raise DsdpoError(f"loss.objective: unknown {self.objective!r}; choose from {OBJECTIVES}")
        if self.objective == "per_draw" and not self.supervised and self.batch_level:
            used = ", ".join(sorted(self.batch_level))
            raise DsdpoError(
                f"loss.objective per_draw needs a loss of each pair alone, not {used} "
                f"({', '.join(BATCH_LEVEL_LOSSES)} compare pairs with each other; --sft-per-response makes "
                "sft a loss of each pair)"
            )


def _require_finite(name: str, value: float, *, positive: bool) -> None:
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise DsdpoError(f"loss.{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
