"""Sharded checkpoints that a crash cannot corrupt, and exact resume.

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

Data order and Monte Carlo draws are pure functions of (seed, epoch, position, example id), so
restoring the batcher's position restores them exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsdpo import __version__
from dsdpo.errors import DsdpoError
from dsdpo.runtime.faults import crash_point
from dsdpo.runtime.safe_load import check_checkpoint_pickles

STATE_FILE = "dsdpo_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best"  # --keep-best: names the best evaluated checkpoint; _prune never removes it
STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written


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


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half


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
            _atomic_write(partial / STATE_FILE, json.dumps(meta, indent=1))
            _fsync_tree(partial)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(partial, folder)
            _fsync_dir(output)
            _atomic_write(output / LATEST_FILE, tag)
            if best:
                write_best(output, tag)
            _prune(output, keep=keep_last, protect=tag)
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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under a checkpoint folder but its state file (which
    holds them): a flipped byte in a shard is then found at load, not trained on."""
    return {
        str(path.relative_to(folder)): _file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }


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
        if _file_digest(path) != digest:
            raise DsdpoError(
                f"{path} is corrupt: its contents differ from the digest recorded when it was saved; "
                "resume from an earlier checkpoint"
            )
    check_checkpoint_pickles(folder, trusted=trust_checkpoint)


def write_best(output: Path, tag: str) -> None:
    """Point `best` at checkpoint `tag` (atomically)."""
    _atomic_write(output / BEST_FILE, tag)


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


def _prune(output: Path, *, keep: int, protect: str) -> None:
    """Remove all but the newest `keep` checkpoints, sparing `protect`, the current best, and the
    best that each kept checkpoint names (a resume from it points `best` there again)."""
    complete = sorted(complete_checkpoints(output))
    retained = complete[-keep:]
    kept = {protect, best_checkpoint_name(output)} | {_named_best(folder) for folder in retained}
    for folder in complete[:-keep]:
        if folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)


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
    _atomic_write(
        out / STATE_FILE, json.dumps({**meta, "universal": True, "digests": file_digests(out)}, indent=1)
    )
    return out


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


# --- reading a checkpoint's weights (dsdpo.models.loading.load_model, dsdpo export) ---

# The engine wraps the model in MaskedTokenScorer, whose only child is `model`.
WRAPPER_PREFIX = "model."


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


def _lazy_weights(folder: Path) -> dict[str, object]:
    """name -> lazy fp32 tensor, with the wrapper prefix removed and tied duplicates dropped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DsdpoError(f"{folder}: cannot read the DeepSpeed shards ({err})") from err
    weights, seen = {}, set()
    for name, tensor in lazy.items():
        if id(tensor) in seen:  # a tied weight (e.g. lm_head = embeddings): saved once, re-tied on load
            continue
        seen.add(id(tensor))
        weights[name.removeprefix(WRAPPER_PREFIX)] = tensor
    return weights


PEFT_PREFIX = "base_model.model."  # where PEFT puts the base model's own parameter names
ADAPTER_CONFIG = "adapter_config.json"  # written beside config.json by a LoRA run


def _lora_scale(hf_files: Path) -> float | None:
    """alpha / r of a LoRA run's adapters (PEFT's scaling), or None for a full fine-tuning run."""
    adapter = hf_files / ADAPTER_CONFIG
    if not adapter.is_file():
        return None
    try:
        settings = json.loads(adapter.read_text())
        alpha, rank = settings["lora_alpha"], settings["r"]
    except (ValueError, KeyError, TypeError) as err:
        raise DsdpoError(f"{adapter}: not a LoRA adapter config ({err})") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise DsdpoError(f"{adapter}: r must be a positive integer and lora_alpha a number, got r={rank!r}")
    return alpha / rank


def weight_sources(folder: Path) -> dict[str, tuple[torch.Size, Callable[[], torch.Tensor]]]:
    """Output name -> (shape, a function that materialises the fp32 tensor), one tensor at a time.

    A LoRA run's adapters are merged into the weights they adapt: W + (alpha/r)·B·A.
    """
    lazy = _lazy_weights(folder)
    scale = _lora_scale(folder / "hf")
    sources = {}
    for name, tensor in lazy.items():
        if scale is None:
            sources[name] = (tensor.shape, tensor.contiguous)
        elif ".lora_A." in name or ".lora_B." in name:
            continue  # folded into their base weight below
        elif name.endswith(".base_layer.weight"):
            stem = name.removesuffix(".base_layer.weight")
            a, b = lazy[f"{stem}.lora_A.default.weight"], lazy[f"{stem}.lora_B.default.weight"]
            merged = lambda w=tensor, a=a, b=b: w.contiguous() + scale * (b.contiguous() @ a.contiguous())  # noqa: E731
            sources[f"{stem.removeprefix(PEFT_PREFIX)}.weight"] = (tensor.shape, merged)
        else:
            sources[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = (
                tensor.shape,
                tensor.contiguous,
            )
    return sources


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point weights to the output precision; integer buffers keep their type."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
