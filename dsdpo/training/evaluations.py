"""A run's held-out evaluations: --eval-data's preference scores and --eval-problems' generation
accuracy (dsdpo.evaluation.held_out), built once the engines run, due every --eval-every steps and at
the last step. The sets themselves are read and checked before start-up (plan_run).
"""

from __future__ import annotations

from dsdpo.config import Config
from dsdpo.evaluation.held_out import HeldOutAccuracy, HeldOutEvaluation, write_generations
from dsdpo.families import block_size_of
from dsdpo.objective.scoring import ScoreSettings
from dsdpo.reference.interface import Reference
from dsdpo.runtime.checkpoint import step_tag
from dsdpo.training.setup import RunPlan


class RunEvaluations:
    """The evaluations a run's options ask for (none, either or both), run at the same steps."""

    def __init__(self, config: Config, plan: RunPlan, *, is_rank0: bool):
        self.plan, self.is_rank0 = plan, is_rank0
        self.every, self.total_steps = config.train.eval_every, plan.total_steps
        self.preference = _held_out_evaluation(config, plan)
        self.accuracy = _held_out_accuracy(config, plan)
        self.any = self.preference is not None or self.accuracy is not None

    def due(self, step: int) -> bool:
        """--eval-every's steps and the last one, when the run evaluates at all."""
        return self.any and (step == self.total_steps or (bool(self.every) and step % self.every == 0))

    def run(self, policy, reference: Reference, step: int) -> dict[str, float]:
        """The held-out metrics of this step: preference scores and/or generation accuracy."""
        results = self.preference.run(policy, reference) if self.preference else {}
        if self.accuracy is not None:
            accuracy, records = self.accuracy.run(policy)
            results.update(accuracy)
            if self.is_rank0:
                write_generations(self.plan.output, step_tag(step), records)
        return results


def _held_out_evaluation(config: Config, plan: RunPlan) -> HeldOutEvaluation | None:
    """--eval-data: the held-out pairs' eval/* metrics at every evaluation; None without it."""
    if plan.eval_pairs is None:
        return None
    return HeldOutEvaluation(
        plan.eval_pairs,
        loss=config.loss,
        settings=ScoreSettings(
            budget=config.score.budget,
            estimator=config.score.estimator,
            steps=config.score.steps,
            seed=config.train.seed,
        ),
        max_tokens_no_grad=config.score.no_grad_tokens,
        mask_token_id=plan.mask_token_id,
        pad_token_id=plan.tokenizer.pad_token_id or 0,
        block_size=block_size_of(plan.hf_config),
    )


def _held_out_accuracy(config: Config, plan: RunPlan) -> HeldOutAccuracy | None:
    """--eval-problems: generation accuracy at every evaluation; None without it."""
    if plan.eval_problems is None:
        return None
    return HeldOutAccuracy(
        plan.eval_problems,
        tokenizer=plan.tokenizer,
        mask_token_id=plan.mask_token_id,
        sampler=config.eval_sampler.generate_kwargs(),  # resolved for the model by plan_run
        samples=config.train.eval_samples,
        seed=config.train.seed,
        chat=config.eval_sampler.chat,
    )
