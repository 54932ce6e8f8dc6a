"""The score section (ScoreConfig): the ELBO estimator, its Monte Carlo budget and the chunk sizes."""

from __future__ import annotations

from dataclasses import dataclass

from dsdpo.errors import DsdpoError
from dsdpo.settings import setting

# The choices the settings offer, importable without torch (the command line is built from them):
ESTIMATORS = ("l_over_L", "one_over_t", "trajectory")  # the ELBO estimators of dsdpo.objective.draws

DEFAULT_TOKENS = 4096  # --max-tokens-per-forward unset, off CUDA (dsdpo/planner/chunking.py)


@dataclass
class ScoreConfig:
    estimator: str = setting("l_over_L", "ELBO estimator (dsdpo/objective/draws.py)", choices=ESTIMATORS)
    budget: int = setting(8, "Monte Carlo draws per response (VRPO's n)")
    steps: int | None = setting(
        None, "unmasking steps T of the trajectory estimator (default L)", flag="--trajectory-steps"
    )
    # "auto": the largest chunks the planner fits in the free device memory (dsdpo/planner/chunking.py).
    # Resolved to a number when training starts.
    max_tokens_per_forward: int | str | None = setting(
        None,
        'rows x tokens per forward with gradients: the activation-memory knob, or "auto": the largest '
        "chunks the planner fits in the free device memory (default: auto on CUDA, 4096 elsewhere)",
    )
    # No activations are kept for backward without gradients, so this can be several times larger.
    max_tokens_no_grad: int | None = setting(
        None, "rows x tokens per forward without gradients (default 4 x --max-tokens-per-forward)"
    )
    # VRPO's antithetic sampling: the shared noise cancels in B̂_θ − B̂_ref.
    antithetic: bool = setting(
        True,
        "give the reference its own draws instead of the policy's (an ablation of VRPO)",
    )

    def validate(self):
        if self.estimator not in ESTIMATORS:
            raise DsdpoError(
                f"score.estimator: unknown {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}"
            )
        if self.budget < 1:
            raise DsdpoError(f"score.budget must be at least 1, got {self.budget}")
        tokens = self.max_tokens_per_forward
        if isinstance(tokens, str) and tokens != "auto":
            raise DsdpoError(f'score.max_tokens_per_forward: a positive number or "auto", got {tokens!r}')
        for name in ("max_tokens_per_forward", "max_tokens_no_grad"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise DsdpoError(f"score.{name} must be positive, got {value}")

    @property
    def no_grad_tokens(self) -> int:
        if self.max_tokens_no_grad is None:
            return 4 * self.max_tokens_per_forward
        return self.max_tokens_no_grad
