"""DeepSpeed's universal checkpoints: resumable on any number of ranks (converted by DeepSpeed's own
ds_to_universal in a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint.finding import check_checkpoint, verify_checkpoint
from dsdpo.runtime.checkpoint.layout import STATE_FILE, atomic_write, file_digests


def is_universal(folder: Path) -> bool:
    """Whether a checkpoint was converted to DeepSpeed's universal format (any world size loads it)."""
    return bool(check_checkpoint(folder).get("universal"))


def convert_to_universal(checkpoint: Path, out: Path, *, trust_checkpoint: bool = False) -> Path:
    """DeepSpeed's universal checkpoint of `checkpoint`, plus dsdpo's files: resumable on any number
    of ranks with the same train_batch_size. The state file is written last, as in a save."""
    meta = check_checkpoint(checkpoint)
    verify_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    if meta.get("universal"):
        raise DsdpoError(f"{checkpoint} is already a universal checkpoint")
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DsdpoError(f"{checkpoint}: DeepSpeed's conversion failed: {result.stderr.strip()[-500:]}")
    shutil.copytree(checkpoint / "hf", out / "hf", dirs_exist_ok=True)
    atomic_write(
        out / STATE_FILE, json.dumps({**meta, "universal": True, "digests": file_digests(out)}, indent=1)
    )
    return out
