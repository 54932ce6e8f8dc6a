"""The order of preference pairs: length-grouped batches, a pure function of (seed, epoch), resumable.

One epoch's order: shuffle all pairs, sort each window of ~50 global batches by length (similar
lengths share a batch, so less padding), cut into global batches of batch_size × world_size, then
shuffle the batch order (so long and short batches alternate). The last incomplete global batch is
dropped. Rank r takes slice r of each global batch. Every rank computes the same order from
(seed, epoch) alone, so no communication is needed and a restored position continues exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError

WINDOW_BATCHES = 50  # batches per length-sorting window: large enough to group, small enough to mix

# Fields that fix the order: a state saved under other values cannot continue the same sequence.
# (The order depends on batch_size × world_size only: a run may resume on other ranks with the same
# global batch.)
ORDER_FIELDS = ("seed", "global_batch", "num_pairs", "shuffle", "group_by_length")


def epoch_order(
    lengths: Sequence[int], global_batch: int, *, seed: int, epoch: int, shuffle: bool, group_by_length: bool
) -> list[list[int]]:
    """The global batches (lists of pair indices) of one epoch."""
    rng = random.Random(f"dsdpo-batches:{seed}:{epoch}")  # a str seed hashes the same in every process
    indices = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(indices)
    if group_by_length:
        window = WINDOW_BATCHES * global_batch
        indices = [
            index
            for start in range(0, len(indices), window)
            for index in sorted(indices[start : start + window], key=lambda i: lengths[i])
        ]
    batches = [
        indices[start : start + global_batch]
        for start in range(0, len(indices) - global_batch + 1, global_batch)
    ]
    if shuffle:
        rng.shuffle(batches)
    return batches


class PairBatcher:
    """Yields, batch after batch, the list of TokenizedPair for this rank.

    `position` is the number of batches already yielded in `epoch`; iterating goes from there to the
    end of the epoch, then moves to the next epoch. `state_dict()` / `load_state_dict()` save and
    restore it: the next batch after a restore is exactly the one that would have come.
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        batch_size: int,
        *,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DsdpoError(f"bad batching: batch_size {batch_size}, world_size {world_size}, rank {rank}")
        if len(pairs) < batch_size * world_size:
            raise DsdpoError(
                f"{len(pairs)} pairs are fewer than one global batch of {batch_size * world_size} "
                f"(batch_size {batch_size} × world_size {world_size})"
            )
        self.pairs = list(pairs)
        self.lengths = [pair.length for pair in self.pairs]
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.pairs) // (self.batch_size * self.world_size)

    def global_batches(self, epoch: int) -> list[list[int]]:
        return epoch_order(
            self.lengths,
            self.batch_size * self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            group_by_length=self.group_by_length,
        )

    def roll_over_finished_epoch(self) -> None:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0

    def __iter__(self) -> Iterator[list[TokenizedPair]]:
        self.roll_over_finished_epoch()
        epoch, start = self.epoch, self.rank * self.batch_size
        for index, batch in enumerate(self.global_batches(epoch)[self.position :], self.position):
            # Counted before the yield: a state saved while this batch trains says it was taken.
            self.position = index + 1
            yield [self.pairs[i] for i in batch[start : start + self.batch_size]]
        self.roll_over_finished_epoch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "global_batch": self.batch_size * self.world_size,
            "num_pairs": len(self.pairs),
            "shuffle": self.shuffle,
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        for field in ORDER_FIELDS:
            if field in state and state[field] != current[field]:
                raise DsdpoError(
                    f"cannot continue the data order: the saved {field} is {state[field]!r}, now it is "
                    f"{current[field]!r}"
                )
        if not 0 <= state["position"] <= len(self):
            raise DsdpoError(
                f"saved data position {state['position']} is outside an epoch of {len(self)} batches"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        # Saved after the last batch of an epoch: the next batch to come is the next epoch's first.
        self.roll_over_finished_epoch()
