"""A checkpoint's files: the folder layout, step names, atomic writes and file digests.

Layout under the run's output folder:

    step_000123/            DeepSpeed's sharded ZeRO-3 files (every rank writes its own shard)
    step_000123/hf/         the model's config and tokenizer (what `dsdpo export` needs beside weights)
    step_000123/dsdpo_state.json   written last, by rank 0, after every rank finished: "complete"
    step_000123.partial/    a checkpoint being written; renamed to step_000123 once complete
    latest                  the name of the newest complete checkpoint, replaced atomically
    best                    with --keep-best: the name of the best evaluated checkpoint (never pruned)

The state file records a SHA-256 digest of every other file; readers verify them before loading.
`latest` moves only after the state file exists, so a process killed while writing leaves the
previous checkpoint as the one that resumes. `latest` is trusted only when it names a complete
checkpoint inside the folder (it could hold anything: random bytes, a path to another run);
otherwise the newest complete checkpoint is used, and the caller says so.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

STATE_FILE = "dsdpo_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best"  # --keep-best: names the best evaluated checkpoint; prune_checkpoints never removes it
STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under a checkpoint folder but its state file (which
    holds them): a flipped byte in a shard is then found at load, not trained on."""
    return {
        str(path.relative_to(folder)): file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }
