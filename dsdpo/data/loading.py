"""Reading preference rows from JSONL, JSON, Parquet and `datasets` folders.

Each reader yields (source, row) where source names the file and line ("data.jsonl:3") or row
("data.parquet:row 3"); a row that could not even be parsed comes as a RowError. Validation and
counting happen once, in `load_preference_data`, whatever the format.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsdpo.data.rows import PreferenceExample, RowError, parse_completion_row, parse_row
from dsdpo.errors import DsdpoError

Rows = Iterator[tuple[str, Any]]


def _parse_json(text: str) -> Any:
    """json.loads, with the errors a hostile file can cause as RowError: bad syntax, and nesting deep
    enough to exhaust Python's recursion (json.loads raises RecursionError, not a JSON error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError("malformed", f"not valid JSON ({err.msg})") from None
    except RecursionError:
        raise RowError("malformed", "JSON nested too deeply") from None


def read_jsonl(path: Path) -> Rows:
    with path.open("rb") as lines:  # bytes: a line that is not UTF-8 is that line's error, not the file's
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM some editors write
            except UnicodeDecodeError as err:
                yield (
                    f"{path}:{number}",
                    RowError("malformed", f"not UTF-8 text (byte {raw[err.start]:#04x})"),
                )
                continue
            if not line.strip():
                continue  # a blank line (often the last one) is no row
            try:
                yield f"{path}:{number}", _parse_json(line)
            except RowError as err:
                yield f"{path}:{number}", err


def read_json(path: Path) -> Rows:
    """A JSON list of rows; a `.json` file holding JSON lines (common on the Hub) reads as JSONL."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM some editors write
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DsdpoError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            yield from read_jsonl(path)
            return
        raise DsdpoError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    except RecursionError:
        raise DsdpoError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DsdpoError(f"{path}: expected a JSON list of rows, found a {type(data).__name__}")
    for number, row in enumerate(data, 1):
        yield f"{path}:row {number}", row


def read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DsdpoError(f"{path}: not a readable Parquet file ({err})") from err
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path}:row {number}", row


def pick_split(dataset, path: Path, split: str | None):
    """A Dataset from a DatasetDict: the split asked for, else 'train', else the only one."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset, None
    names = list(dataset)
    if split is None:
        split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
    if split not in names:
        raise DsdpoError(f"{path}: choose a split with --split (the folder has {', '.join(names)})")
    return dataset[split], split


def read_datasets_folder(path: Path, split: str | None) -> Rows:
    """A `save_to_disk` folder, or a script-free folder of data files that `load_dataset` reads."""
    import datasets

    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        dataset = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise DsdpoError(f"{path}: not a readable datasets folder ({err})") from err
    dataset, split = pick_split(dataset, path, split)
    label = f"{path}[{split}]" if split else str(path)
    for number, row in enumerate(dataset, 1):
        yield f"{label}:row {number}", row


def read_rows(path: Path, split: str | None = None) -> Rows:
    if path.is_dir():
        return read_datasets_folder(path, split)
    if not path.is_file():
        raise DsdpoError(f"{path}: no such file or folder")
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}
    if path.suffix not in readers:
        raise DsdpoError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or a folder"
        )
    return readers[path.suffix](path)


def load_preference_data(
    path: str | Path, *, skip_invalid: bool = False, split: str | None = None, completions: bool = False
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """The examples of a data file, and the count of skipped rows by reason (empty unless skip_invalid).
    With `completions`, SFT examples: prompt and completion (or chosen), no rejected side.

    A bad row raises DsdpoError naming file and line ('data.jsonl:3: field "chosen" is missing').
    Ids must be unique: the draws and any precomputed reference scores are keyed on them.
    """
    examples: list[PreferenceExample] = []
    skipped: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for source, row in read_rows(Path(path), split):
        try:
            if isinstance(row, RowError):
                raise row
            example = (parse_completion_row if completions else parse_row)(row, source)
            if example.id in seen:
                raise RowError("duplicate_id", f'id "{example.id}" repeats the row at {seen[example.id]}')
        except RowError as err:
            if not skip_invalid:
                raise DsdpoError(f"{source}: {err} (--skip-invalid skips such rows)") from None
            skipped[err.reason] += 1
            continue
        seen[example.id] = source
        examples.append(example)
    if not examples:
        raise DsdpoError(f"{path}: no usable rows" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return examples, dict(skipped)
