"""A checkpoint's pickled shards are read only if they hold data, never code.

DeepSpeed's shard files (*.pt) are pickles, and DeepSpeed reads them with torch.load(weights_only=
False): a pickle may call any function it names, so a checkpoint from someone else could run anything
while it loads. Before DeepSpeed reads a checkpoint, every .pt file in it is unpickled with torch's
weights_only unpickler, which builds tensors, containers and numbers only, plus the few DeepSpeed types
that DeepSpeed's own checkpoints hold. A file naming anything else is refused, unless the user trusts
the checkpoint (`--trust-checkpoint`).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from dsdpo.errors import DsdpoError

TRUST_HINT = "pass --trust-checkpoint only if you trust whoever wrote it"


def deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor types in a ZeRO-3 checkpoint's optimizer shards (and a universal checkpoint's
    optimizer_state.pt), fp32 or bf16: the stage marker and the static loss scaler, pickled whole.
    (fp16's DynamicLossScaler never appears: dsdpo.runtime.ds_config refuses fp16.)"""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


def _refused_global(error: pickle.UnpicklingError) -> str | None:
    """The callable the weights_only unpickler refused (e.g. 'posix.system'); None when it refused
    the bytes themselves (a corrupt file), which name nothing."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The unpickler's own words (e.g. 'Unsupported operand 31'), without PyTorch's advice around them."""
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(error))
    return found.group(1) if found else "an unreadable pickle"


def check_shard(path: Path) -> None:
    """Unpickle `path` with torch's weights_only unpickler; refuse it if it names anything else.

    A zip-format file is memory-mapped, so only its pickle is read, not its tensors' bytes.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if (name := _refused_global(err)) is None:
            raise DsdpoError(
                f"{path}: not a readable checkpoint shard (corrupt: {_unpickler_reason(err)})"
            ) from None
        raise DsdpoError(
            f"{path}: refused: it holds pickled objects that are not weights (it calls {name}), "
            f"and loading it could run code; {TRUST_HINT}"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise DsdpoError(f"{path}: not a readable checkpoint shard ({err})") from None


def check_checkpoint_pickles(folder: Path, *, trusted: bool) -> None:
    """Check every .pt file under a checkpoint folder (a universal checkpoint keeps them in
    subfolders) before DeepSpeed unpickles any of them; `trusted` skips the check."""
    if trusted:
        return
    for path in sorted(Path(folder).rglob("*.pt")):
        check_shard(path)
