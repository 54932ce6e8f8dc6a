"""Loading preference rows from every format, and each bad-input case with its message."""

import json

import pytest

from dsdpo.data import load_preference_data
from dsdpo.data.rows import content_id
from dsdpo.errors import DsdpoError

ROWS = [
    {"id": "a", "prompt": "2+2?", "chosen": "4", "rejected": "5", "preference_prob": 0.9},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def check_examples(examples):
    assert [e.id for e in examples] == [
        "a",
        content_id(ROWS[1]["prompt"], ROWS[1]["chosen"], ROWS[1]["rejected"]),
    ]
    assert examples[0].prompt == "2+2?" and examples[0].preference_prob == 0.9
    assert examples[1].conversational and examples[1].chosen == ROWS[1]["chosen"]
    assert examples[1].preference_prob is None


def test_jsonl_keeps_fields_and_line_sources(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "", ROWS[1]])
    examples, skipped = load_preference_data(path)
    check_examples(examples)
    assert skipped == {}
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    check_examples(load_preference_data(tmp_path / "list.json")[0])
    write_jsonl(tmp_path / "lines.json", ROWS)
    check_examples(load_preference_data(tmp_path / "lines.json")[0])


def test_parquet_and_datasets_folders(tmp_path):
    import datasets

    plain = [ROWS[0], {"id": "b", "prompt": "1+1?", "chosen": "2", "rejected": "3", "preference_prob": None}]
    dataset = datasets.Dataset.from_list(plain)
    dataset.to_parquet(tmp_path / "d.parquet")
    examples, _ = load_preference_data(tmp_path / "d.parquet")
    assert [(e.id, e.chosen, e.preference_prob) for e in examples] == [("a", "4", 0.9), ("b", "2", None)]
    assert examples[1].source == f"{tmp_path / 'd.parquet'}:row 2"

    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "saved")
    examples, _ = load_preference_data(tmp_path / "saved")
    assert [e.id for e in examples] == ["a", "b"]

    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", plain)
    examples, _ = load_preference_data(folder)
    assert [e.chosen for e in examples] == ["4", "2"]


BAD_ROWS = [
    ("{not json", "malformed", "not valid JSON"),
    ('["a list"]', "malformed", "the row is a list, not an object"),
    ({"prompt": "p", "rejected": "r"}, "missing_field", 'field "chosen" is missing'),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty_response", 'field "chosen" is empty'),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical", "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "malformed", 'field "rejected" must be text'),
    (
        {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
        "malformed",
        'field "chosen" must hold exactly one message, with role "assistant"',
    ),
    (
        {"prompt": "p", "chosen": "c", "rejected": "r", "preference_prob": 1.5},
        "bad_preference_prob",
        r'field "preference_prob" must be a number in \[0, 1\], got 1.5',
    ),
    ({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}, "duplicate_id", 'id "a" repeats the row at'),
]


@pytest.mark.parametrize(("row", "reason", "message"), BAD_ROWS)
def test_each_bad_row_names_file_and_line_or_is_counted(tmp_path, row, reason, message):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], row, ROWS[1]])
    with pytest.raises(DsdpoError, match=f"^{tmp_path / 'data.jsonl'}:2: {message}"):
        load_preference_data(path)
    examples, skipped = load_preference_data(path, skip_invalid=True)
    assert skipped == {reason: 1}
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]


def test_missing_file_unknown_format_and_nothing_usable(tmp_path):
    with pytest.raises(DsdpoError, match="no such file or folder"):
        load_preference_data(tmp_path / "none.jsonl")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DsdpoError, match=r"unknown data format '\.csv'"):
        load_preference_data(tmp_path / "d.csv")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(DsdpoError, match=r"no usable rows \(skipped: \{'missing_field': 1\}\)"):
        load_preference_data(path, skip_invalid=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not UTF-8 text (byte 0xe9)"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (
            b'{"prompt": "x\\ud800", "chosen": "a", "rejected": "b"}',
            'field "prompt" holds an invalid character',
        ),
        (
            b'{"prompt": "x", "chosen": "a\\udfff", "rejected": "b"}',
            'field "chosen" holds an invalid character',
        ),
        (
            b'{"prompt": [{"role": "wizard", "content": "hi"}], '
            b'"chosen": [{"role": "assistant", "content": "a"}], '
            b'"rejected": [{"role": "assistant", "content": "b"}]}',
            "field \"prompt\" message 1 has role 'wizard'",
        ),
    ],
)
def test_hostile_rows_are_one_error_naming_file_and_line_or_are_counted(tmp_path, line, message):
    good = json.dumps(ROWS[0]).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(DsdpoError) as error:
        load_preference_data(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    examples, skipped = load_preference_data(path, skip_invalid=True)
    assert [e.id for e in examples] == ["a"] and sum(skipped.values()) == 1


def test_a_json_file_with_a_latin1_byte_or_deep_nesting_names_the_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DsdpoError, match=r"d\.json:2: not UTF-8 text"):
        load_preference_data(path)
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DsdpoError, match=r"d\.json: JSON nested too deeply"):
        load_preference_data(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Issue 20: a JSONL file saved with a BOM (Windows editors) was refused at its first row."""
    for name, text in [
        ("bom.jsonl", "".join(json.dumps(row) + "\n" for row in ROWS)),
        ("bom.json", json.dumps(ROWS)),
    ]:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        check_examples(load_preference_data(tmp_path / name)[0])
