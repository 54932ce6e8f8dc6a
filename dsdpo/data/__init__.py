"""Preference data: loading and validating rows, tokenising, batching, statistics, reasoning pairs.

examples, skipped = load_preference_data("pairs.jsonl", skip_invalid=True)
pairs, cuts = tokenize_pairs(examples, tokenizer, max_length=1024)
for rank_pairs in PairBatcher(pairs, batch_size=4, seed=0, world_size=w, rank=r):
    batch = collate_pairs(rank_pairs, tokenizer.pad_token_id)
"""

from dsdpo.data.batching import PairBatcher
from dsdpo.data.collate import PairBatch, collate_pairs
from dsdpo.data.loading import load_preference_data
from dsdpo.data.rows import PreferenceExample
from dsdpo.data.tokenize import TokenizedPair, tokenize_pairs

__all__ = [
    "PairBatch",
    "PairBatcher",
    "PreferenceExample",
    "TokenizedPair",
    "collate_pairs",
    "load_preference_data",
    "tokenize_pairs",
]
