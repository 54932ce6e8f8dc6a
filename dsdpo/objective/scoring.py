"""Scores that training and evaluation share: keyed per-draw ELBO terms of preference pairs.

    scores = score_pairs(model, pairs, mask_token_id=m, pad_token_id=p, settings=ScoreSettings(budget=8))
    terms, calls = engine_terms(engine, batch, draws, mask_token_id=m, max_tokens=4096)

`score_pairs` scores a data set with a plain module (evaluation, `dsdpo score`, the precomputed
reference); `engine_terms` scores one batch with a ZeRO-3 engine in step with the other ranks (the
reference during training, held-out evaluation). Both key their draws as training does
(`dsdpo.objective.draws.pair_draws`), so two models scored with the same settings see the same masks
(antithetic, docs/design.md, "VRPO: variance-reduced preference scores (LLaDA 1.5)").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dsdpo.config import ESTIMATORS
from dsdpo.data.collate import collate_pairs
from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError
from dsdpo.families import block_size_of_model
from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.chunks import calls_per_rank, padded_calls, plan_chunks
from dsdpo.objective.draws import Draws, pair_draws
from dsdpo.objective.elbo import draw_terms, forward_rows, row_logprob_sums, standard_error


@torch.no_grad()
def no_grad_row_sums(engine, batch: ScoringBatch, draws: Draws, mask_token_id: int, chunks, count) -> Tensor:
    """Every row's log-probability sum, in `count` forwards (fillers after the real chunks)."""
    sums = []
    for rows, real in padded_calls(chunks, count):
        result = engine(**forward_rows(batch, draws, rows, mask_token_id))
        if real:
            sums.append(result)
    return torch.cat(sums)


def engine_terms(engine, batch: ScoringBatch, draws: Draws, *, mask_token_id: int, max_tokens: int):
    """([B, n] per-draw terms, forwards run) of a batch scored without gradients by a ZeRO-3 engine.

    Every rank runs as many forwards as the rank with the most chunks (each forward gathers the
    parameters collectively): one collective agrees on the count.
    """
    chunks = plan_chunks(batch, draws, max_tokens)
    (calls,) = calls_per_rank(chunks)
    sums = no_grad_row_sums(engine, batch, draws, mask_token_id, chunks, calls)
    return draw_terms(sums, draws), calls


@dataclass(frozen=True)
class ScoreSettings:
    """How responses are scored: the draws (budget, estimator, keys) and the batching."""

    budget: int = 8
    estimator: str = "l_over_L"
    steps: int | None = None  # unmasking steps T of the trajectory estimator (score.steps)
    seed: int = 0
    epoch: int = 0
    batch_size: int = 8  # pairs per batch
    max_tokens_per_forward: int | None = None  # rows × sequence length per forward call
    progress: bool = False

    def __post_init__(self):
        if self.budget < 1:
            raise DsdpoError(f"budget must be at least 1, got {self.budget}")
        if self.estimator not in ESTIMATORS:
            raise DsdpoError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.steps is not None and self.steps < 1:
            raise DsdpoError(f"trajectory steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise DsdpoError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_tokens_per_forward is not None and self.max_tokens_per_forward < 1:
            raise DsdpoError(f"max tokens per forward must be positive, got {self.max_tokens_per_forward}")


@dataclass
class PairScores:
    """Per-draw ELBO terms of each pair's chosen and rejected response (float64, on the CPU)."""

    example_ids: list[str]
    chosen_terms: Tensor  # [P, n]
    rejected_terms: Tensor  # [P, n]
    preference_prob: Tensor | None  # [P] soft labels, or None
    chosen_lengths: Tensor | None = None  # [P] response tokens, for the per-token losses
    rejected_lengths: Tensor | None = None

    @classmethod
    def of(cls, pairs: Sequence[TokenizedPair], chosen_terms: Tensor, rejected_terms: Tensor) -> PairScores:
        """The scores of `pairs` from their per-draw terms, with their soft labels and lengths."""
        probs = [pair.preference_prob for pair in pairs]
        return cls(
            example_ids=[pair.example_id for pair in pairs],
            chosen_terms=chosen_terms,
            rejected_terms=rejected_terms,
            preference_prob=None
            if all(p is None for p in probs)
            else torch.tensor([1.0 if p is None else p for p in probs], dtype=torch.float64),
            chosen_lengths=torch.tensor([len(pair.chosen_ids) for pair in pairs]),
            rejected_lengths=torch.tensor([len(pair.rejected_ids) for pair in pairs]),
        )

    @property
    def chosen(self) -> Tensor:
        return self.chosen_terms.mean(-1)

    @property
    def rejected(self) -> Tensor:
        return self.rejected_terms.mean(-1)

    @property
    def chosen_std_error(self) -> Tensor:
        return standard_error(self.chosen_terms)

    @property
    def rejected_std_error(self) -> Tensor:
        return standard_error(self.rejected_terms)

    def records(self) -> list[dict]:
        """One JSON-ready row per pair: the ELBO estimate and standard error of each response."""
        rows = zip(
            self.example_ids,
            self.chosen.tolist(),
            _floats(self.chosen_std_error),
            self.rejected.tolist(),
            _floats(self.rejected_std_error),
            strict=True,
        )
        return [
            {"id": i, "chosen_elbo": c, "chosen_std_error": ce, "rejected_elbo": r, "rejected_std_error": re}
            for i, c, ce, r, re in rows
        ]


def _floats(values: Tensor) -> list[float | None]:
    """JSON has no NaN: an undefined value becomes None (null)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    mask_token_id: int,
    pad_token_id: int,
    settings: ScoreSettings = ScoreSettings(),
    desc: str = "score",
) -> PairScores:
    """The per-draw ELBO terms of every pair, `settings.batch_size` pairs at a time, in eval mode."""
    if not pairs:
        raise DsdpoError("there are no pairs to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block_size = block_size_of_model(model)
    chosen, rejected = [], []
    try:
        with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not settings.progress) as bar:
            for start in range(0, len(pairs), settings.batch_size):
                batch = collate_pairs(list(pairs[start : start + settings.batch_size]), pad_token_id)
                scoring = ScoringBatch.build(
                    batch.input_ids.to(device),
                    batch.response_mask.to(device),
                    batch.attention_mask.to(device),
                )
                draws = pair_draws(
                    batch.example_ids,
                    scoring.response_lengths,
                    settings.budget,
                    settings.estimator,
                    seed=settings.seed,
                    epoch=settings.epoch,
                    steps=settings.steps,
                    block_size=block_size,
                    response_starts=scoring.response_starts,
                )
                sums = row_logprob_sums(
                    model, scoring, draws, mask_token_id=mask_token_id,
                    max_tokens_per_forward=settings.max_tokens_per_forward,
                )  # fmt: skip
                terms = draw_terms(sums, draws).to("cpu", torch.float64)
                chosen.append(terms[: batch.num_pairs])
                rejected.append(terms[batch.num_pairs :])
                bar.update(batch.num_pairs)
    finally:
        model.train(was_training)
    return PairScores.of(pairs, torch.cat(chosen), torch.cat(rejected))
