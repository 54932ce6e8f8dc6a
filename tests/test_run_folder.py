"""The output folder: a run never writes over another one, `latest` is trusted only inside it, a resume
sets an abandoned branch aside and cuts the log back, and a failing disk is one line."""

import json
import time

import pytest

from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint import LATEST_FILE, STATE_FILE, find_resume_checkpoint
from dsdpo.runtime.run_folder import LOCK_FILE, check_writable, cut_metrics_to, set_aside_later_checkpoints
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.run_helpers import REPO, metrics_by_step, run_train, start_train, tail, train_args


def _complete(output, step):
    folder = output / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("latest", "why"),
    [(b"\x8f\xff\x00garbage", "does not name"), (None, "does not name"), (b"step_000009", "does not name")],
)
def test_latest_is_trusted_only_when_it_names_a_complete_checkpoint_inside_the_folder(tmp_path, latest, why):
    other_run = _complete(tmp_path / "other", 5)
    output = tmp_path / "run"
    _complete(output, 1), _complete(output, 3)
    (output / "step_000009.partial").mkdir()
    (output / LATEST_FILE).write_bytes(latest if latest is not None else str(other_run.resolve()).encode())
    folder, note = find_resume_checkpoint(output, "auto")
    assert folder == output / "step_000003"  # the newest complete checkpoint of this folder
    assert why in note and "using the newest complete checkpoint, step_000003" in note
    (output / LATEST_FILE).write_text("step_000001")
    assert find_resume_checkpoint(output, "auto") == (output / "step_000001", None)
    (output / LATEST_FILE).unlink()  # issue 20: a deleted `latest` was passed over without a word
    assert find_resume_checkpoint(output, "auto") == (
        output / "step_000003",
        f"{output / LATEST_FILE} is missing; using the newest complete checkpoint, step_000003",
    )
    assert find_resume_checkpoint(tmp_path / "empty", "auto") == (None, None)  # a fresh run: no note


def test_a_resume_cuts_the_log_back_and_drops_a_torn_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in range(6)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert cut_metrics_to(tmp_path, 3) == 3  # steps 4 and 5, and the torn line
    assert sorted(metrics_by_step(tmp_path)) == [0, 1, 2, 3]


def test_checkpoints_after_the_resumed_step_are_set_aside(tmp_path):
    for step in (3, 6, 9, 12):
        _complete(tmp_path, step)
    assert set_aside_later_checkpoints(tmp_path, 6) == ["step_000009", "step_000012"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000006"]
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == ["step_000009", "step_000012"]


def test_an_output_that_cannot_be_a_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DsdpoError, match=r"cannot write to the output folder .*file/run: Not a directory"):
        check_writable(tmp_path / "file" / "run")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(addition_pairs(8, seed=3), tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _args(model_dir, data_file, output, *extra):
    options = dict(max_steps=2, budget=2, beta=0.5, epochs=2)
    return [*train_args(REPO / "ds_configs" / "cpu.json", model_dir, data_file, output, **options), *extra]


def test_a_fresh_run_into_a_run_folder_is_refused_unless_overwrite(tiny_gemma_dir, data_file, tmp_path):
    output = tmp_path / "run"
    first = run_train(_args(tiny_gemma_dir, data_file, output))
    assert first.returncode == 0, tail(first)
    again = run_train(_args(tiny_gemma_dir, data_file, output))
    assert again.returncode == 2 and "holds a run already" in again.stderr.strip().splitlines()[-1], tail(
        again
    )
    assert "Traceback" not in again.stderr
    over = run_train(_args(tiny_gemma_dir, data_file, output, "--overwrite"))
    assert over.returncode == 0, tail(over)
    logged = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2] and (output / LATEST_FILE).read_text() == "step_000002"


# Runs launch/train.py with every file capped at 64 KiB: a write past the cap fails with EFBIG (SIGXFSZ
# ignored), as on a full disk. The cap is set by the child itself, not by a preexec_fn, so that a failure
# to set it shows in the child's stderr instead of as an exception inside subprocess.
_WITH_SMALL_FILES = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
cap = 64 * 1024 if hard == resource.RLIM_INFINITY else min(64 * 1024, hard)
resource.setrlimit(resource.RLIMIT_FSIZE, (cap, hard))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_disk_that_fills_while_saving_is_one_line_and_no_partial_checkpoint_counts(
    tiny_gemma_dir, data_file, tmp_path
):
    import subprocess
    import sys

    from tests.run_helpers import _environment

    output = tmp_path / "run"
    command = [
        sys.executable,
        "-c",
        _WITH_SMALL_FILES,
        str(REPO / "launch" / "train.py"),
        *map(str, _args(tiny_gemma_dir, data_file, output)),
    ]
    result = subprocess.run(command, env=_environment(None), capture_output=True, text=True, cwd=REPO)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: saving checkpoint step_000002 failed"), tail(
        result
    )
    assert "no checkpoint was kept" in last and "Traceback" not in result.stderr
    assert not list(output.glob("step_*[0-9]")) and not (output / LATEST_FILE).exists()


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_its_pid(tiny_gemma_dir, tmp_path):
    """Issue 20: two runs into one --output both ran and interleaved metrics.jsonl. The second is
    refused naming the first's pid; once the first is killed, a resume takes its lock over, saying so."""
    data = write_jsonl(addition_pairs(16), tmp_path / "pairs.jsonl")
    output = tmp_path / "run"
    args = train_args(
        REPO / "ds_configs" / "cpu.json", tiny_gemma_dir, data, output, budget=2, epochs=500, max_steps=1000
    )
    first = start_train(args)
    try:
        lock = output / LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = run_train([*args, "--resume", "auto"])
        assert second.returncode == 2, tail(second)
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {output} is in use by another dsdpo run (pid {first.pid}, {lock}): "
            "wait for it to end or stop it, or choose another --output"
        )
    finally:
        first.kill()
        first.wait()
    resumed = run_train([*args[:-1], "1", "--resume", "auto"])  # --max-steps 1: a short resume
    assert resumed.returncode == 0, tail(resumed)
    assert f"note: {lock}: pid {first.pid} died while running here; its lock is taken over" in resumed.stdout
    assert lock.read_text() == ""  # a run that ended leaves no pid behind


def test_a_resume_before_the_first_checkpoint_logs_step_0_once(tiny_gemma_dir, tmp_path):
    """Issue 20: killed after step 1 (the step-0 evaluation logged, no checkpoint yet), `--resume auto`
    starts over and logged step 0 a second time."""
    data = write_jsonl(addition_pairs(16), tmp_path / "pairs.jsonl")
    held = [{**row, "id": f"held-{row['id']}"} for row in addition_pairs(4, seed=5)]
    held_out = write_jsonl(held, tmp_path / "held.jsonl")
    options = dict(budget=2, max_steps=2, eval_data=held_out, eval_every=3, save_every=3)
    args = train_args(REPO / "ds_configs" / "cpu.json", tiny_gemma_dir, data, tmp_path / "run", **options)
    killed = run_train(args, env={"DSDPO_FAULT": "after_step:1"})
    assert killed.returncode == -9, tail(killed)
    resumed = run_train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, tail(resumed)
    logged = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [0, 1, 2]
