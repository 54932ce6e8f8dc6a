"""What killed or finished DeepSpeed processes leave behind: a build lock no longer makes every later run
hang, and a shared-memory buffer no longer holds 66 MB of RAM until reboot."""

import os
from pathlib import Path

from dsdpo.runtime.leftovers import (
    clear_stale_build_locks,
    clear_stale_shared_buffers,
    shared_allreduce_buffers,
)
from tests.run_helpers import run_train, tail


def test_only_locks_no_process_holds_open_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, building = tmp_path / "cpu_adam" / "lock", tmp_path / "async_io" / "lock"
    for lock in (stale, building):
        lock.parent.mkdir()
    stale.write_text("")
    held = os.open(building, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does while it builds
    try:
        assert clear_stale_build_locks() == [stale]
        assert not stale.exists() and building.exists()
    finally:
        os.close(held)


def test_a_run_goes_on_past_a_stale_lock_of_the_op_it_loads(tmp_path):
    # The CPU accelerator's communication op is loaded at every start; a lock left in its build
    # folder made runs wait forever with no output.
    lock = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    try:
        result = run_train(["--demo", "--output", tmp_path / "demo", "--max-steps", "1"], timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    assert result.returncode == 0, tail(result)
    assert f"note: removed {lock}, left by a build of a DeepSpeed op that was killed" in result.stderr


def test_only_shared_buffers_no_process_holds_open_are_removed():
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_dsdpo-test_{os.getpid()}"
    left, live = Path(f"{prefix}_0"), Path(f"{prefix}_1")
    left.write_bytes(b"0" * 64)
    held = os.open(live, os.O_CREAT | os.O_RDWR)  # the creating rank keeps its descriptor (shm.cpp)
    try:
        assert left in shared_allreduce_buffers() and live in shared_allreduce_buffers()
        assert left in clear_stale_shared_buffers()
        assert not left.exists() and live.exists()
    finally:
        os.close(held)
        live.unlink()
        left.unlink(missing_ok=True)
