"""Finding a run's checkpoints and checking one before it is read: complete ones, what `latest`
names, --resume, a run folder given as a model, the state file and the recorded digests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint.layout import LATEST_FILE, STATE_FILE, STEP_PATTERN, file_digest
from dsdpo.runtime.safe_load import check_checkpoint_pickles


def complete_checkpoints(output: Path) -> list[Path]:
    """Checkpoint folders whose state file exists (written last), oldest first."""
    if not output.is_dir():
        return []
    found = [p for p in output.iterdir() if STEP_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def latest_checkpoint(output: Path) -> tuple[Path | None, str | None]:
    """The checkpoint `latest` names when it is a complete one inside `output`, else the newest
    complete checkpoint; and a note saying why `latest` was passed over (None when it was used)."""
    complete = complete_checkpoints(output)
    newest = complete[-1] if complete else None
    latest = output / LATEST_FILE
    if not latest.is_file():  # deleted by hand, or a crash between a rename and its write
        return newest, newest and f"{latest} is missing; using the newest complete checkpoint, {newest.name}"
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is not None and STEP_PATTERN.match(name) and (output / name / STATE_FILE).is_file():
        return output / name, None
    fallback = f"using the newest complete checkpoint, {newest.name}" if newest else "no checkpoint to use"
    return newest, f"{latest} does not name a complete checkpoint of this folder ({name!r:.60}); {fallback}"


def find_resume_checkpoint(output: Path, resume: str) -> tuple[Path | None, str | None]:
    """`--resume auto`: the newest complete checkpoint in the output folder (None for a fresh run),
    with a note when `latest` was passed over. `--resume PATH`: that checkpoint folder, which must
    be complete."""
    if resume == "auto":
        return latest_checkpoint(output)
    folder = Path(resume)
    check_checkpoint(folder)
    return folder, None


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint's metadata; a missing, partial or corrupt one is an error naming the file."""
    if not folder.is_dir():
        raise DsdpoError(f"{folder}: no such checkpoint folder")
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise DsdpoError(
            f"{state_file} is missing: {folder} is not a complete dsdpo checkpoint "
            "(it was interrupted while being written, or is not a checkpoint); resume from an earlier one"
        )
    try:
        meta = json.loads(state_file.read_text())
        meta["state"], meta["world_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DsdpoError(f"{state_file}: corrupt checkpoint state ({err})") from err
    shards = list(folder.glob("*model_states.pt"))
    if not shards:
        raise DsdpoError(
            f"{folder}: no DeepSpeed model shards (*model_states.pt); the checkpoint is incomplete"
        )
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step_NNNNNN), or a run folder whose `latest` names one."""
    folder = Path(path)
    if (folder / LATEST_FILE).is_file() and not folder.name.startswith("step_"):
        newest, note = latest_checkpoint(folder)
        if note:
            print(f"warning: {note}", file=sys.stderr)
        folder = newest or folder
    check_checkpoint(folder)
    return folder


def is_checkpoint(path: str | Path) -> bool:
    folder = Path(path)
    return (folder / STATE_FILE).is_file() or (folder / LATEST_FILE).is_file()


def verify_checkpoint(folder: Path, *, trust_checkpoint: bool) -> None:
    """Before any shard is read: every file matches the digest recorded at save (an error naming the
    first that does not), and holds only data unless `trust_checkpoint` (dsdpo.runtime.safe_load)."""
    digests = check_checkpoint(folder).get("digests")
    if digests is None:
        print(
            f"note: {folder} was saved without file digests (by an older dsdpo): its files are not verified",
            file=sys.stderr,
        )
    for name, digest in (digests or {}).items():
        path = folder / name
        if not path.is_file():
            raise DsdpoError(f"{path} is missing: the checkpoint is incomplete; resume from an earlier one")
        if file_digest(path) != digest:
            raise DsdpoError(
                f"{path} is corrupt: its contents differ from the digest recorded when it was saved; "
                "resume from an earlier checkpoint"
            )
    check_checkpoint_pickles(folder, trusted=trust_checkpoint)
