"""`dsdpo data stats`: counts, length percentiles and truncation of a small file."""

import json

from click.testing import CliRunner

from dsdpo.cli import main


def test_stats_command_counts_lengths_and_truncation(tmp_path, tiny_gemma_dir):
    rows = [
        {"prompt": "ab", "chosen": "c", "rejected": "de"},  # lengths with EOS: 2, 2, 3
        {"prompt": "abcd", "chosen": "efgh", "rejected": "i", "preference_prob": 0.7},  # 4, 5, 2
        {"prompt": "x", "chosen": "y"},  # no rejected: skipped
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", "stats", str(path), "--model", str(tiny_gemma_dir), "--max-length", "6", "--skip-invalid"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["pairs"] == 2 and stats["with_preference_prob"] == 1
    assert stats["skipped"] == {"missing_field": 1}
    assert stats["tokens"]["prompt"] == {"p50": 2, "p90": 4, "p99": 4, "p100": 4, "mean": 3.0}
    assert stats["tokens"]["per_pair"]["p100"] == 2 * 4 + 5 + 2
    # max_length 6: the second chosen (4 + 5 tokens) is cut to 2 tokens; nothing else is.
    assert stats["truncation"] == {
        "max_length": 6,
        "prompt_truncated": 0,
        "prompt_cut_to_fit": 0,
        "response_truncated": 1,
        "identical_after_truncation": 0,
        "prompt_too_long": 0,
    }
    text = CliRunner().invoke(main, args)
    assert "pairs: 2" in text.output and "skipped rows: missing_field 1" in text.output

    bad = CliRunner().invoke(main, ["data", "stats", str(path), "--model", str(tiny_gemma_dir)])
    assert bad.exit_code == 1
    assert f'Error: {path}:3: field "rejected" is missing' in bad.output
