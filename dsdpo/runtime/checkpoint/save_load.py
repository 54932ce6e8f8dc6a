"""A run's state in a checkpoint (TrainState beside the engine's shards and the RNG): saved so that
a crash cannot corrupt it, loaded for exact resume.

Data order and Monte Carlo draws are pure functions of (seed, epoch, position, example id), so
restoring the batcher's position restores them exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsdpo import __version__
from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint.finding import check_checkpoint, latest_checkpoint, verify_checkpoint
from dsdpo.runtime.checkpoint.layout import (
    LATEST_FILE,
    PARTIAL_SUFFIX,
    STATE_FILE,
    atomic_write,
    file_digests,
    step_tag,
)
from dsdpo.runtime.checkpoint.retention import prune_checkpoints, write_best
from dsdpo.runtime.faults import crash_point


@dataclass
class TrainState:
    """Everything beside the engine's weights and optimizer that a resumed run needs."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    consumed_pairs: int = 0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    batcher: dict[str, Any] = field(default_factory=dict)  # PairBatcher.state_dict(): epoch, position
    data_digest: str = ""  # dsdpo.data.rows.examples_digest of the data trained on ("" before it existed)
    best_step: int | None = None  # --keep-best: the step of the best evaluation so far
    best_value: float | None = None  # and its value of the metric


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    engine,
    output: Path,
    state: TrainState,
    *,
    config: dict[str, Any],
    world_size: int,
    is_rank0: bool,
    save_hf_files,
    keep_last: int,
    barrier,
    save_extra=None,
    best: bool = False,
) -> Path:
    """Write step_NNNNNN (all ranks call this), then mark it complete and move `latest` (rank 0).

    Everything is written into step_NNNNNN.partial, made durable (fsync), marked complete, and only
    then renamed to step_NNNNNN: a crash leaves a .partial folder that nothing reads (the next save
    of that step removes it), and an existing step_NNNNNN (a re-save of a step) is replaced whole,
    never mixed with new shards. `save_extra(folder)`, called on every rank before the checkpoint is
    marked complete, writes what else a resume needs (a refreshed reference, dsdpo.reference.refresh).
    `best`: this checkpoint becomes the one `best` names (before pruning, which spares it).
    A write that fails (a full disk) is an error saying so; `latest` still names the last good one.
    """
    tag = step_tag(state.step)
    folder, partial = output / tag, output / f"{tag}{PARTIAL_SUFFIX}"
    if is_rank0 and partial.exists():
        shutil.rmtree(partial)  # left by a crash: DeepSpeed must not write beside old shards
    barrier()
    client_state = {"dsdpo": asdict(state), "rng": _rng_state()}
    try:
        engine.save_checkpoint(str(output), tag=partial.name, client_state=client_state, save_latest=False)
        if save_extra is not None:
            save_extra(partial)
        if is_rank0:
            save_hf_files(partial / "hf")
        barrier()  # every rank's shard is on disk
        crash_point("in_save", state.step)
        if is_rank0:
            meta = {
                "dsdpo_version": __version__,
                "world_size": world_size,
                "state": asdict(state),
                "config": config,
                "digests": file_digests(partial),
            }
            atomic_write(partial / STATE_FILE, json.dumps(meta, indent=1))
            _fsync_tree(partial)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(partial, folder)
            _fsync_dir(output)
            atomic_write(output / LATEST_FILE, tag)
            if best:
                write_best(output, tag)
            prune_checkpoints(output, keep=keep_last, protect=tag)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        latest, _ = latest_checkpoint(output)
        kept = f"the last complete checkpoint, {latest.name}, is kept" if latest else "no checkpoint was kept"
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise DsdpoError(f"saving checkpoint {tag} failed ({reason}; is the disk full?); {kept}") from err
    barrier()
    crash_point("after_save", state.step)
    return folder


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder` on disk, so that the rename publishes whole files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(folder)


def load_checkpoint(
    engine, folder: Path, *, world_size: int, trust_checkpoint: bool = False
) -> tuple[TrainState, dict[str, Any]]:
    """Load weights, optimizer and scheduler into `engine`; return the train state and saved config.

    A universal checkpoint needs `"checkpoint": {"load_universal": true}` in the engine's config.
    Shards holding more than data are refused unless `trust_checkpoint` (dsdpo.runtime.safe_load).
    """
    meta = check_checkpoint(folder)
    if meta["world_size"] != world_size and not meta.get("universal"):
        raise DsdpoError(
            f"{folder} was written with world size {meta['world_size']} and this run has {world_size}: "
            "ZeRO's optimizer shards cannot be re-partitioned in place. Convert it with "
            f"`dsdpo convert-checkpoint {folder}` (DeepSpeed's universal checkpoint) and resume from the "
            "result, or resume with "
            f"world size {meta['world_size']}"
        )
    verify_checkpoint(folder, trust_checkpoint=trust_checkpoint)
    try:
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise DsdpoError(f"{folder}: cannot load the DeepSpeed shards ({err})") from err
    if client_state is None:
        raise DsdpoError(f"{folder}: DeepSpeed found no checkpoint to load")
    _restore_rng(client_state["rng"])
    return TrainState(**client_state["dsdpo"]), meta["config"]


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two nested config dicts."""
    names = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return names
