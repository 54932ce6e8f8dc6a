"""The run's output folder: is it ours to write, which checkpoint is the newest, what a resume keeps.

- A fresh run never writes into a folder that holds another run (its checkpoints, `latest` and
  metrics would be mixed with the new run's): `--resume auto` continues it, `--overwrite` clears
  what dsdpo wrote there first.
- The folder must be writable before the slow distributed start-up, not after.
- A resume cuts metrics.jsonl back to the resumed step (the steps after it will be logged again)
  and drops a last line cut short by a crash or a full disk, so every reader sees whole records.
- Checkpoints of steps after the resumed one belong to an abandoned branch of the run: they are
  moved to `abandoned/`, so that pruning, `--resume auto` and `dsdpo export RUN` see one lineage.
- One run at a time: a second run into a folder that a live run writes is refused, naming its pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint import BEST_FILE, LATEST_FILE, STEP_PATTERN

METRICS_FILE = "metrics.jsonl"
# What a run writes at the top of its folder; --overwrite removes these (and step_* folders) only.
RUN_FILES = (
    LATEST_FILE,
    METRICS_FILE,
    "train_config.yaml",
    "ds_config.json",
    "tensorboard",
    "abandoned",
    BEST_FILE,
    "eval_generations",  # --eval-problems: the answers of each evaluation
)
ABANDONED = "abandoned"
LOCK_FILE = "dsdpo.lock"  # holds the running run's pid; empty once it ended (never in RUN_FILES)


def holds_a_run(output: Path) -> bool:
    return output.is_dir() and (
        any(STEP_PATTERN.match(p.name) for p in output.iterdir())
        or any((output / name).exists() for name in (LATEST_FILE, METRICS_FILE))
    )


def check_fresh_output(output: Path, *, overwrite: bool) -> None:
    """A fresh run's folder holds no run, unless --overwrite was given."""
    if holds_a_run(output) and not overwrite:
        raise DsdpoError(
            f"{output} holds a run already (checkpoints or metrics): continue it with --resume auto, "
            "start over there with --overwrite, or choose another --output"
        )


def clear_run(output: Path) -> None:
    """Remove what an earlier run wrote into `output` (--overwrite); other files are left alone."""
    if not output.is_dir():
        return
    for path in output.iterdir():
        if STEP_PATTERN.match(path.name.split(".")[0]) or path.name in RUN_FILES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_writable(output: Path) -> None:
    """Create the folder and write a file in it: a read-only or full disk fails here, in one line."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output) as probe:
            probe.write(b"dsdpo")
            probe.flush()
    except OSError as err:
        raise DsdpoError(f"cannot write to the output folder {output}: {err.strerror}") from None


def cut_metrics_to(output: Path, step: int) -> int:
    """Keep the metrics records of steps <= `step` (a resume logs the later ones again) and drop
    lines that are not whole JSON records; return how many lines were dropped."""
    path = output / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            whole = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            whole = False
        if whole and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def set_aside_later_checkpoints(output: Path, step: int) -> list[str]:
    """Move the checkpoints of steps after `step` (an abandoned branch) to output/abandoned/."""
    later = [p for p in output.iterdir() if (m := STEP_PATTERN.match(p.name)) and int(m.group(1)) > step]
    if later:
        (output / ABANDONED).mkdir(exist_ok=True)
    for folder in later:
        target = output / ABANDONED / folder.name
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
    return sorted(p.name for p in later)


@contextmanager
def run_lock(output: Path, *, enabled: bool) -> Iterator[str | None]:
    """Hold output/dsdpo.lock while the run writes (rank 0: `enabled`); yield a note when the lock file
    names a process that died holding it. flock, not the file's existence, is the lock: the kernel
    drops it when its holder dies, however it dies, so a stale lock never blocks a resume."""
    if not enabled:
        yield None
        return
    path = output / LOCK_FILE
    with path.open("a+") as handle:
        handle.seek(0)
        holder = handle.read().strip()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DsdpoError(
                f"{output} is in use by another dsdpo run (pid {holder or 'unknown'}, {path}): "
                "wait for it to end or stop it, or choose another --output"
            ) from None
        _write_pid(handle, str(os.getpid()))
        try:
            yield f"{path}: pid {holder} died while running here; its lock is taken over" if holder else None
        finally:
            _write_pid(handle, "")  # ended cleanly; the kernel releases the lock as the file closes


def _write_pid(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
