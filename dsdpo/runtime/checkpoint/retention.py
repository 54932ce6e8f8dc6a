"""Which checkpoints stay: `best` (--keep-best) and pruning to the newest --keep-last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsdpo.runtime.checkpoint.finding import complete_checkpoints
from dsdpo.runtime.checkpoint.layout import BEST_FILE, STATE_FILE, STEP_PATTERN, atomic_write, step_tag


def write_best(output: Path, tag: str) -> None:
    """Point `best` at checkpoint `tag` (atomically)."""
    atomic_write(output / BEST_FILE, tag)


def best_checkpoint_name(output: Path) -> str | None:
    """The checkpoint name `best` holds, when it is one (else None)."""
    try:
        name = (output / BEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_PATTERN.match(name) else None


def _named_best(folder: Path) -> str | None:
    """The best checkpoint as of `folder`'s step (its state's best_step), which a resume from
    `folder` points `best` at; None when it names none or its state cannot be read."""
    try:
        step = json.loads((folder / STATE_FILE).read_text())["state"].get("best_step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return step_tag(step) if isinstance(step, int) else None


def prune_checkpoints(output: Path, *, keep: int, protect: str) -> None:
    """Remove all but the newest `keep` checkpoints, sparing `protect`, the current best, and the
    best that each kept checkpoint names (a resume from it points `best` there again)."""
    complete = sorted(complete_checkpoints(output))
    retained = complete[-keep:]
    kept = {protect, best_checkpoint_name(output)} | {_named_best(folder) for folder in retained}
    for folder in complete[:-keep]:
        if folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)
