"""Evaluation on held-out data during training (`--eval-data FILE --eval-every N`).

Every evaluation scores the same pairs with the same keyed draws (epoch 0 of the run's seed), so a
change of `eval/*` between two evaluations is the policy's, not Monte Carlo noise; and the reference
sees those draws too (antithetic, docs/design.md, "VRPO"). The engines are ZeRO-3's, so every rank
scores every held-out pair, in step with the others (each forward gathers parameters collectively).

Preference runs log TRL's metrics of dsdpo.evaluate (eval/loss, eval/rewards/accuracies, ...), SFT
runs the held-out NLL per response token (eval/loss) and mean ELBO (eval/logps/chosen).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from dsdpo.data.collate import collate_pairs
from dsdpo.data.tokenize import TokenizedPair
from dsdpo.diffusion import ScoringBatch
from dsdpo.dist import device
from dsdpo.draws import pair_draws
from dsdpo.evaluate import preference_report
from dsdpo.loss import LossConfig
from dsdpo.scoring import PairScores, ScoreSettings, engine_terms
from dsdpo.sft import pad_completions_with_eos

EVAL_BATCH = 8  # held-out pairs scored together


class HeldOutEvaluation:
    """Scores held-out pairs with the training engines; `run` returns the `eval/*` metrics."""

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        loss: LossConfig,
        settings: ScoreSettings,
        max_tokens_no_grad: int,
        mask_token_id: int,
        pad_token_id: int,
        eos_token_id: int | None = None,
    ):
        self.pairs = list(pairs)
        if loss.supervised:  # completions padded with EOS per batch, as SFT trains on them (dsdpo.sft)
            self.pairs = [
                padded
                for start in range(0, len(pairs), EVAL_BATCH)
                for padded in pad_completions_with_eos(self.pairs[start : start + EVAL_BATCH], eos_token_id)
            ]
        self.loss = loss
        self.settings = replace(settings, epoch=0)  # the same draws at every evaluation
        self.max_tokens = max_tokens_no_grad
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id

    def _terms(self, engine, pairs: list[TokenizedPair]) -> Tensor:
        """[2P, n] (or [P, n] for SFT) per-draw ELBO terms of a batch, on the CPU in float64."""
        supervised = self.loss.supervised
        batch = collate_pairs(pairs, self.pad_token_id, chosen_only=supervised)
        scoring = ScoringBatch.build(
            batch.input_ids.to(device()), batch.response_mask.to(device()), batch.attention_mask.to(device())
        )
        draws = pair_draws(
            batch.example_ids,
            scoring.response_lengths,
            self.settings.budget,
            self.settings.estimator,
            seed=self.settings.seed,
            epoch=self.settings.epoch,
            steps=self.settings.steps,
            chosen_only=supervised,
        )
        terms, _ = engine_terms(
            engine, scoring, draws, mask_token_id=self.mask_token_id, max_tokens=self.max_tokens
        )
        return terms.to("cpu", torch.float64)

    @torch.no_grad()
    def _chosen_and_rejected_terms(self, engine) -> tuple[Tensor, Tensor | None]:
        chosen, rejected = [], []
        for start in range(0, len(self.pairs), EVAL_BATCH):
            pairs = self.pairs[start : start + EVAL_BATCH]
            terms = self._terms(engine, pairs)
            chosen.append(terms[: len(pairs)])
            rejected.append(terms[len(pairs) :])
        return torch.cat(chosen), None if self.loss.supervised else torch.cat(rejected)

    def run(self, policy, reference) -> dict[str, float]:
        """`reference`: the training run's reference model (an engine, or the adapter-off policy:
        dsdpo.reference.Reference.model), or None (precomputed or reference-free training: held-out
        rewards are then reference-free)."""
        chosen, rejected = self._chosen_and_rejected_terms(policy)
        lengths = torch.tensor([len(pair.chosen_ids) for pair in self.pairs])
        if self.loss.supervised:
            elbos = chosen.mean(1)
            return {"eval/logps/chosen": float(elbos.mean()), "eval/loss": float((-elbos / lengths).mean())}
        policy_scores = PairScores.of(self.pairs, chosen, rejected)
        reference_scores = (
            None
            if reference is None
            else PairScores.of(self.pairs, *self._chosen_and_rejected_terms(reference))
        )
        report = preference_report(policy_scores, reference_scores, self.loss, self.settings)
        return {f"eval/{name}": value for name, value in report.trl_metrics().items()}
