"""What a preference data file holds: counts, token length percentiles, what truncation would cut."""

from __future__ import annotations

from dsdpo.data.rows import PreferenceExample
from dsdpo.data.tokenize import encode_example, truncate_pair, truncation_counter

PERCENTILES = (50, 90, 99, 100)


def percentile(sorted_values: list[int], q: int) -> int:
    """Nearest-rank percentile: always a length that occurs in the data."""
    rank = max(1, -(-q * len(sorted_values) // 100))  # ceil(q/100 · n), at least the first
    return sorted_values[rank - 1]


def summarize(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    summary = {f"p{q}": percentile(ordered, q) for q in PERCENTILES}
    summary["mean"] = round(sum(ordered) / len(ordered), 1)
    return summary


def truncation_counts(pairs, max_length: int, max_prompt_length: int | None) -> dict[str, int]:
    counts = truncation_counter()
    for pair in pairs:
        truncate_pair(pair, max_length=max_length, max_prompt_length=max_prompt_length, counts=counts)
    return dict(counts)


def data_stats(
    examples: list[PreferenceExample],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict:
    """Counts and token lengths of untruncated pairs; with max_length, how many would be cut."""
    pairs = [encode_example(example, tokenizer) for example in examples]
    stats = {
        "pairs": len(examples),
        "conversational": sum(example.conversational for example in examples),
        "with_preference_prob": sum(example.preference_prob is not None for example in examples),
        "tokens": {
            "prompt": summarize([len(p.prompt_ids) for p in pairs]),
            "chosen": summarize([len(p.chosen_ids) for p in pairs]),
            "rejected": summarize([len(p.rejected_ids) for p in pairs]),
            # Both sequences of a pair go through the model: the prompt counts twice.
            "per_pair": summarize(
                [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
            ),
        },
    }
    if max_length is not None:
        stats["truncation"] = {
            "max_length": max_length,
            **truncation_counts(pairs, max_length, max_prompt_length),
        }
    return stats


def format_stats(stats: dict, skipped: dict[str, int]) -> str:
    lines = [
        f"pairs: {stats['pairs']} (conversational {stats['conversational']}, "
        f"with preference_prob {stats['with_preference_prob']})"
    ]
    if skipped:
        lines.append("skipped rows: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    lines.append("tokens      " + "".join(f"{name:>8}" for name in stats["tokens"]["prompt"]))
    for part, summary in stats["tokens"].items():
        lines.append(f"{part:<12}" + "".join(f"{value:>8}" for value in summary.values()))
    if "truncation" in stats:
        cut = dict(stats["truncation"])
        lines.append(
            f"at max_length {cut.pop('max_length')}: " + ", ".join(f"{k} {v}" for k, v in cut.items())
        )
    return "\n".join(lines)
