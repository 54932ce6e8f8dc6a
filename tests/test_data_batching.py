"""The data order: a pure function of (seed, epoch), length-grouped, split by rank, restorable."""

import pytest

from dsdpo.data import PairBatcher, TokenizedPair
from dsdpo.errors import DsdpoError


def make_pairs(n):
    # Lengths vary (1..7) so length grouping has something to do.
    return [TokenizedPair(f"e{i}", [1] * (1 + i % 7), [2], [3], None) for i in range(n)]


def ids(batches):
    return [[p.example_id for p in batch] for batch in batches]


def test_order_depends_on_seed_and_epoch_only():
    pairs = make_pairs(40)
    first = PairBatcher(pairs, 4, seed=3)
    epoch0, epoch1 = ids(first), ids(first)
    assert first.epoch == 2 and len(first) == 10 and len(epoch0) == 10
    assert epoch0 != epoch1
    again = PairBatcher(pairs, 4, seed=3)
    assert ids(again) == epoch0 and ids(again) == epoch1
    assert ids(PairBatcher(pairs, 4, seed=4)) != epoch0
    # Each epoch uses every pair at most once.
    flat = [i for batch in epoch0 for i in batch]
    assert len(set(flat)) == len(flat) == 40


def test_length_grouping_cuts_padding():
    pairs = make_pairs(70)

    def padding(batcher):
        return sum(max(p.length for p in b) * len(b) - sum(p.length for p in b) for b in batcher)

    grouped = padding(PairBatcher(pairs, 7, seed=0))
    ungrouped = padding(PairBatcher(pairs, 7, seed=0, group_by_length=False))
    assert grouped < ungrouped


def test_ranks_split_each_global_batch_and_drop_the_incomplete_one():
    pairs = make_pairs(23)
    whole = ids(PairBatcher(pairs, 6, seed=1))
    ranks = [ids(PairBatcher(pairs, 3, seed=1, world_size=2, rank=r)) for r in (0, 1)]
    assert len(whole) == 3  # 23 // 6: the last 5 pairs are dropped
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole


def test_restore_continues_exactly_where_it_stopped():
    pairs = make_pairs(30)
    reference = PairBatcher(pairs, 3, seed=7)
    expected = ids(reference) + ids(reference)

    run = PairBatcher(pairs, 3, seed=7)
    taken = []
    for batch in run:
        taken.append([p.example_id for p in batch])
        if len(taken) == 4:
            state = run.state_dict()
            break
    assert state["epoch"] == 0 and state["position"] == 4

    resumed = PairBatcher(pairs, 3, seed=7)
    resumed.load_state_dict(state)
    taken += ids(resumed)  # the rest of epoch 0
    taken += ids(resumed)  # epoch 1
    assert taken == expected

    # A state saved after the last batch of an epoch continues with the next epoch.
    end = PairBatcher(pairs, 3, seed=7)
    end.load_state_dict({**state, "position": len(end)})
    assert (end.epoch, end.position) == (1, 0)
    assert ids(end) == expected[len(end) :]


def test_bad_restores_and_sizes_are_errors():
    pairs = make_pairs(10)
    batcher = PairBatcher(pairs, 2, seed=0)
    with pytest.raises(DsdpoError, match="the saved seed is 1, now it is 0"):
        batcher.load_state_dict({**batcher.state_dict(), "seed": 1})
    with pytest.raises(DsdpoError, match="saved data position 9 is outside an epoch of 5 batches"):
        batcher.load_state_dict({**batcher.state_dict(), "position": 9})
    with pytest.raises(DsdpoError, match=r"10 pairs are fewer than one global batch of 12"):
        PairBatcher(pairs, 6, world_size=2)
