"""Which rows of a micro-batch's draws go in which forward call, and how many calls each rank makes.

A forward call holds at most `max_tokens_per_forward` tokens, counted as rows × the widest row's
width (a block model's row is [noised ; clean], twice its sequence):
- plan_chunks cuts the rows in order: a score (dsdpo.objective.elbo), both passes of the sequence
  objective, SFT;
- plan_unit_chunks keeps each (pair, draw) unit whole: the per-draw objective's loss of a unit needs
  all of its rows in one forward (docs/design.md, "The per-draw objective").
Under ZeRO-3 every forward gathers the parameters collectively, so every rank makes as many calls as
the rank with the most chunks (calls_per_rank), a rank with fewer repeating its first chunk as a
filler (padded_calls; dsdpo.objective.chunk_loop gives the filler a zero coefficient).

How many tokens a chunk may hold is decided before: a number, or "auto" from the planner's memory
formulas (dsdpo/planner/chunking.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsdpo.objective.batch import ScoringBatch
from dsdpo.objective.draws import Draws
from dsdpo.runtime.dist import all_reduce_max


def row_widths(batch: ScoringBatch, draws: Draws) -> Tensor:
    """[R] each row's width in a forward: its sequence, twice over for a block model ([noised ; clean])."""
    copies = 1 if draws.block_size is None else 2
    return batch.sequence_ends[draws.example] * copies


def plan_chunks(batch: ScoringBatch, draws: Draws, max_tokens_per_forward: int | None) -> list[Tensor]:
    """Split the rows into consecutive chunks of at most `max_tokens_per_forward` (rows × width) tokens.

    A row longer than the budget goes alone. No budget: one chunk holding every row.
    """
    if max_tokens_per_forward is None or draws.num_rows == 0:
        return [torch.arange(draws.num_rows)]
    ends = row_widths(batch, draws).tolist()
    chunks, start, width = [], 0, 0
    for row, end in enumerate(ends):
        new_width = max(width, end)
        if row > start and (row - start + 1) * new_width > max_tokens_per_forward:
            chunks.append(torch.arange(start, row))
            start, new_width = row, end
        width = new_width
    chunks.append(torch.arange(start, len(ends)))
    return chunks


def draw_units(draws: Draws) -> Tensor:
    """[R] each row's (pair, draw) unit, pair × budget + draw: a pair's chosen and rejected rows of
    draw k share one (the rows of P pairs' 2P responses, chosen first)."""
    return (draws.example % (draws.batch_size // 2)) * draws.budget + draws.draw


def plan_unit_chunks(batch: ScoringBatch, draws: Draws, max_tokens_per_forward: int) -> list[Tensor]:
    """Rows in chunks of whole (pair, draw) units, at most `max_tokens_per_forward` (rows × width)
    tokens each unless one unit alone is larger: a unit's chosen and rejected rows of draw k go together."""
    unit = draw_units(draws)
    ends = row_widths(batch, draws)
    chunks, current, count, width = [], [], 0, 0
    for u in unit.unique().tolist():
        rows = (unit == u).nonzero(as_tuple=True)[0]
        new_width = max(width, int(ends[rows].max()))
        if current and (count + len(rows)) * new_width > max_tokens_per_forward:
            chunks.append(torch.cat(current))
            current, count, new_width = [], 0, int(ends[rows].max())
        current.append(rows)
        count, width = count + len(rows), new_width
    chunks.append(torch.cat(current))
    return chunks


def calls_per_rank(*plans: list[Tensor]) -> list[int]:
    """For each plan, the number of forward calls every rank makes: the most chunks any rank has
    (one collective for all the plans; every rank must call it)."""
    return [int(n) for n in all_reduce_max([len(chunks) for chunks in plans])]


def padded_calls(chunks: list[Tensor], count: int) -> list[tuple[Tensor, bool]]:
    """(rows, is_real) for `count` calls: the real chunks, then repeats of the first as fillers."""
    return [(rows, True) for rows in chunks] + [(chunks[0], False)] * (count - len(chunks))
