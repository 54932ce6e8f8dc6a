"""What killed or finished DeepSpeed processes leave behind on this machine, and the "built
successfully" line when nothing was built (quiet_cached_op_loads).

Build locks. DeepSpeed compiles its C++ ops on first use (torch.utils.cpp_extension): the building
process creates `<extensions dir>/<op>/lock`, holds it open while it builds, and removes it when
done. A process killed meanwhile leaves the file, and every later load of that op waits for it to go
away, with no output.

Shared-memory buffers. Under the `deepspeed` launcher the CPU accelerator's communication op maps a
66 MB file per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (DeepSpeed's
csrc/cpu/comm/shm.cpp), and never removes it: RAM lost until reboot, 19 GB after a day of test runs,
until the machine's memory ran out. dsdpo.runtime.engine removes its own ranks' names once every rank has
mapped them; runs from before that, or of other programs, are cleared here.

Either file, when no process on this machine holds it open, is such a leftover: it is removed (said
on stderr) before DeepSpeed starts. Linux only (it reads /proc); elsewhere nothing is done.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path


def _op_folders(name: str) -> list[Path]:
    """`name` in each op's folder under torch's extensions folder (TORCH_EXTENSIONS_DIR or its default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return sorted(Path(root).glob(f"*/{name}"))
    from torch.utils.cpp_extension import get_default_build_root

    return sorted(Path(get_default_build_root()).glob(f"*/*/{name}"))  # <root>/py311_cpu/<op>/lock


def extension_locks() -> list[Path]:
    """The build lock files of the ops' folders."""
    return _op_folders("lock")


def _built_libraries() -> dict[Path, float]:
    """Each built op library and when it was written."""
    return {path: path.stat().st_mtime for path in _op_folders("*.so")}


@contextlib.contextmanager
def quiet_cached_op_loads():
    """DeepSpeed prints "DeepSpeed <op> built successfully" each time it loads its shared-memory
    communication op (deepspeed/comm/torch.py, build_shm_op), also when torch only loaded the library
    it had built before. Within this block that line is dropped unless a library was written
    meanwhile: a real build keeps it, and the compiler's own output is never touched (it is not
    Python's stdout). Other lines printed meanwhile are passed on at the end."""
    before = _built_libraries()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        built = _built_libraries() != before
        for line in printed.getvalue().splitlines(keepends=True):
            if built or not line.rstrip().endswith(" built successfully"):
                sys.stdout.write(line)


def open_files() -> set[Path] | None:
    """Every file some process on this machine holds open (None without /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    held = set()
    for fd_folder in proc.glob("[0-9]*/fd"):
        try:
            held.update(Path(os.readlink(fd)) for fd in fd_folder.iterdir())
        except OSError:  # a process that ended, or one we may not look into
            continue
    return held


def _remove_unheld(paths: list[Path], what: str) -> list[Path]:
    """Remove those of `paths` that no process holds open; return them."""
    if not paths:
        return []
    held = open_files()
    if held is None:
        return []
    stale = [path for path in paths if path.resolve() not in held]
    for path in stale:
        path.unlink(missing_ok=True)
        print(f"note: removed {path}, {what}", file=sys.stderr)
    return stale


def clear_stale_build_locks() -> list[Path]:
    """Remove the build locks no process holds open; return them."""
    return _remove_unheld(extension_locks(), "left by a build of a DeepSpeed op that was killed")


SHARED_MEMORY = Path("/dev/shm")


def _allreduce_buffer_prefix() -> str:
    return f"deepspeed_allreduce_buffer_{os.getuid()}_"  # shm.cpp, shm_initialize: SHM_BUFFER_NAME_<uid>_


def allreduce_buffer(rank: int) -> Path:
    """This process group's all-reduce file of `rank`, named as shm.cpp names it: the prefix, then the
    launcher's MASTER_ADDR and MASTER_PORT and the rank."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHARED_MEMORY / f"{_allreduce_buffer_prefix()}{addr}_{port}_{rank}"


def shared_allreduce_buffers() -> list[Path]:
    """This user's DeepSpeed CPU all-reduce files in /dev/shm."""
    return sorted(SHARED_MEMORY.glob(f"{_allreduce_buffer_prefix()}*"))


def clear_stale_shared_buffers() -> list[Path]:
    """Remove this user's DeepSpeed all-reduce files that no process holds open; return them.

    The rank that creates one keeps its descriptor open from creation to exit (shm.cpp, shared_create),
    so a file listed before /proc is read and held by nobody then belongs to a process that is gone.
    """
    return _remove_unheld(shared_allreduce_buffers(), "a 66 MB DeepSpeed buffer left by an earlier run")
