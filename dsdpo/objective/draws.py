"""Keyed Monte Carlo draws for the ELBO estimators.

docs/design.md, "The score of a response" and "VRPO".

A draw is one unbiased estimate f_k of a response's ELBO B. It is made of one or more forward
*rows*: a set of response positions replaced by the mask token, the subset of those whose
log-probabilities are summed, and a weight. With per-row log-probability sums s_r,

    f_k = Σ_{rows r of draw k} weight_r · s_r,        B̂ = (1/n) Σ_k f_k.

Estimators (L = response length, n = budget):
- "l_over_L": mask count l, then l positions uniformly; weight L/l.      (L/l form, LLaDA)
- "one_over_t": timestep t, each position masked with probability t; weight 1/t.   (1/t form)
- "trajectory": a random unmasking order cut into T groups; T rows per draw, row s scores group s
  with groups s..T-1 masked; weight 1. With T = L its expectation is B exactly.

VRPO (LLaDA 1.5): the n draws use n distinct mask counts / timesteps, one mask each, stratified:
draw k takes its l or t from the k-th of n equal strata. Every random number of draw k comes from a
generator keyed on (seed, example id, epoch, k) and nothing else, so the policy and the reference
see the same masks (antithetic), and a resumed run reproduces them.

Block models (docs/design.md, "The block-diffusion ELBO"): each block's response tokens are a
response of their own to the estimator (L_b tokens, its own stratified l or t, weight L_b/l or 1/t),
drawn one block after the other from draw k's generator; a row masks every block at once, and its
per-position weights (`scored` as floats) carry each block's weight, since a row's blocks differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dsdpo.config import ESTIMATORS
from dsdpo.errors import DsdpoError
from dsdpo.objective.blocks import response_segments


@dataclass(frozen=True)
class DrawKey:
    """What a response's draws are keyed on, beside the draw index."""

    seed: int
    example_id: str | int
    epoch: int = 0


def draw_keys(example_ids: Sequence[str | int], *, seed: int = 0, epoch: int = 0) -> list[DrawKey]:
    return [DrawKey(seed, example_id, epoch) for example_id in example_ids]


def draw_keys_for(example_ids: Sequence[str], seed: int, epoch: int, role: str = "") -> list[DrawKey]:
    """Keys of the 2P responses of a PairBatch, in its order (chosen rows, then rejected rows).

    Training and evaluation both key a pair's draws this way, so an evaluation with the training seed
    and epoch sees the masks training saw, and a policy and its reference share them (antithetic).
    A `role` keys other, independent draws (the reference's, when antithetic sampling is off).
    """
    suffix = f":{role}" if role else ""
    return [
        DrawKey(seed, f"{example_id}:{side}{suffix}", epoch)
        for side in ("chosen", "rejected")
        for example_id in example_ids
    ]


def draw_generator(key: DrawKey, draw_index: int) -> torch.Generator:
    """A CPU generator that depends on (seed, example id, epoch, draw index) alone."""
    text = f"{key.seed}\x1f{key.example_id}\x1f{key.epoch}\x1f{draw_index}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # manual_seed wants < 2**63
    return generator


@dataclass
class Draws:
    """Forward rows over response-relative positions (column j = the j-th response token)."""

    example: Tensor  # [R] long: the batch row (response) each forward row belongs to
    draw: Tensor  # [R] long: the draw index k in 0..budget-1
    masked: Tensor  # [R, Lmax] bool: response positions replaced by the mask token
    # [R, Lmax] positions whose log-probability enters the sum (⊆ masked): bool, or float64 weights
    # of each position's log-probability (0 = not scored) for block models
    scored: Tensor
    weight: Tensor  # [R] float64
    lengths: Tensor  # [B] long: the response lengths the draws were made for
    budget: int
    block_size: int | None = (
        None  # a block model's: rows are scored as [noised ; clean] (dsdpo.objective.blocks)
    )

    @property
    def num_rows(self) -> int:
        return int(self.example.numel())

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())


def _stratum_uniform(generator: torch.Generator, k: int, n: int, stratified: bool) -> float:
    """u in [0, 1): from the k-th of n strata, or from the whole interval when not stratified."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return (k + u) / n if stratified else u


def _rows_for_draw(
    estimator: str, length: int, k: int, n: int, generator: torch.Generator, steps: int, stratified: bool
) -> list[tuple[Tensor, Tensor, float]]:
    """(masked, scored, weight) rows of draw k of a response of `length` tokens."""
    if estimator == "l_over_L":
        # l uniform on {1..L} (stratified over n strata); the l masked positions uniform.  (L/l form)
        s = _stratum_uniform(generator, k, n, stratified)
        count = min(int(s * length) + 1, length)
        masked = torch.randperm(length, generator=generator) < count
        return [(masked, masked, length / count)]
    if estimator == "one_over_t":
        # t uniform on (0, 1] (stratified); each position masked with probability t.  (1/t form)
        t = 1.0 - _stratum_uniform(generator, n - 1 - k, n, stratified)
        masked = torch.rand(length, generator=generator, dtype=torch.float64) < t
        return [(masked, masked, 1.0 / t)]
    # trajectory: rank r of a random order goes to group floor(r*T/L); step s reveals group s.
    num_steps = min(steps, length)
    group = torch.randperm(length, generator=generator) * num_steps // length
    return [(group >= s, group == s, 1.0) for s in range(num_steps)]


def _block_rows_for_draw(
    estimator: str, segments, length: int, k: int, n: int, generator: torch.Generator, steps, stratified
) -> list[tuple[Tensor, Tensor, float]]:
    """Draw k's rows for a block model: each block's rows as for a response of its own, row s of
    every block merged into one row, the block weights moved onto its positions."""
    per_block = [
        _rows_for_draw(estimator, end - first, k, n, generator, steps or end - first, stratified)
        for first, end in segments
    ]
    merged = []
    for s in range(max(len(rows) for rows in per_block)):
        masked, scored = torch.zeros(length, dtype=torch.bool), torch.zeros(length, dtype=torch.float64)
        for (first, end), rows in zip(segments, per_block, strict=True):
            if s < len(rows):
                block_masked, block_scored, block_weight = rows[s]
                masked[first:end], scored[first:end] = block_masked, block_scored * block_weight
        merged.append((masked, scored, 1.0))
    return merged


def sample_draws(
    batch_size: int,
    response_lengths: Sequence[int] | Tensor,
    budget: int,
    estimator: str = "l_over_L",
    *,
    keys: Sequence[DrawKey] | None = None,
    steps: int | None = None,
    stratified: bool = True,
    block_size: int | None = None,
    response_starts: Sequence[int] | Tensor | None = None,
) -> Draws:
    """Draw `budget` keyed ELBO estimates for each of `batch_size` responses.

    keys: one DrawKey per response (default: seed 0, example id = batch index, epoch 0).
    steps: the number T of unmasking steps of the "trajectory" estimator (default: L, exact AO-AR),
        per block for a block model.
    stratified: take draw k's mask count / timestep from the k-th of `budget` strata (VRPO).
    block_size, response_starts: a block model's block length (None for any other model) and the
        sequence position of each response's first token (blocks count from position 0 of prompt +
        response; ignored without block_size).
    """
    lengths = torch.as_tensor(response_lengths, dtype=torch.long).reshape(-1)
    if lengths.numel() != batch_size:
        raise DsdpoError(f"sample_draws: {lengths.numel()} response lengths for batch_size {batch_size}")
    if estimator not in ESTIMATORS:
        raise DsdpoError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if budget < 1:
        raise DsdpoError(f"budget must be at least 1, got {budget}")
    if steps is not None and steps < 1:
        raise DsdpoError(f"trajectory steps must be at least 1, got {steps}")
    if batch_size and int(lengths.min()) < 1:
        raise DsdpoError(f"response {int(lengths.argmin())} of the batch is empty: there is nothing to score")
    if keys is None:
        keys = draw_keys(range(batch_size))
    elif len(keys) != batch_size:
        raise DsdpoError(f"sample_draws: {len(keys)} keys for batch_size {batch_size}")
    if block_size is not None and response_starts is None:
        raise DsdpoError("sample_draws: a block model's draws need the responses' start positions")
    starts = [0] * batch_size if block_size is None else torch.as_tensor(response_starts).tolist()

    width = int(lengths.max()) if batch_size else 0
    example, draw, masked, scored, weight = [], [], [], [], []
    for b, (key, length, start) in enumerate(zip(keys, lengths.tolist(), starts, strict=False)):
        for k in range(budget):
            generator = draw_generator(key, k)
            if block_size is None:
                rows = _rows_for_draw(estimator, length, k, budget, generator, steps or length, stratified)
            else:
                segments = response_segments(start, length, block_size)
                rows = _block_rows_for_draw(
                    estimator, segments, length, k, budget, generator, steps, stratified
                )
            for row_masked, row_scored, row_weight in rows:
                example.append(b)
                draw.append(k)
                masked.append(torch.nn.functional.pad(row_masked, (0, width - length)))
                scored.append(torch.nn.functional.pad(row_scored, (0, width - length)))
                weight.append(row_weight)
    return Draws(
        example=torch.tensor(example, dtype=torch.long),
        draw=torch.tensor(draw, dtype=torch.long),
        masked=torch.stack(masked) if masked else torch.zeros(0, width, dtype=torch.bool),
        scored=torch.stack(scored) if scored else torch.zeros(0, width, dtype=torch.bool),
        weight=torch.tensor(weight, dtype=torch.float64),
        lengths=lengths,
        budget=budget,
        block_size=block_size,
    )


def pair_draws(
    example_ids: Sequence[str],
    response_lengths: Sequence[int] | Tensor,
    budget: int,
    estimator: str,
    *,
    seed: int,
    epoch: int,
    steps: int | None = None,
    chosen_only: bool = False,
    role: str = "",
    block_size: int | None,
    response_starts: Sequence[int] | Tensor,
) -> Draws:
    """The draws of a PairBatch's 2P responses, keyed by draw_keys_for. Training, evaluation and the
    precomputed reference all take their draws here, so they see the same masks. With chosen_only
    (SFT) those of the P chosen responses alone, the same as in a preference batch. block_size: the
    model's (dsdpo.families.block_size_of; None but for a block model), with the responses' start
    positions (see sample_draws); required, so that no caller scores a block model's responses whole."""
    keys = draw_keys_for(example_ids, seed, epoch, role)
    if chosen_only:
        keys = keys[: len(example_ids)]
    return sample_draws(
        len(keys), response_lengths, budget, estimator, keys=keys, steps=steps,
        block_size=block_size, response_starts=response_starts,
    )  # fmt: skip
