"""Running launch/train.py in a subprocess (plain python or the real `deepspeed` launcher)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nvme_available() -> bool:
    """Whether DeepSpeed's async_io op can build here (NVMe offload needs libaio)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def train_args(ds_config, model_dir, data_file, output, **options) -> list:
    """launch/train.py arguments: the four paths, then `--name value` for each option (name_with_dashes)."""
    args = ["--ds_config", ds_config, "--model", model_dir, "--data", data_file, "--output", output]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def _environment(env: dict | None) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)  # the in-process tests' one-rank group must not leak into a new run
    return environment


def _command(args, ranks: int | None) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), *map(str, args)]
    if ranks is None:
        return [sys.executable, *script]
    return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), *script]


def run_train(args, *, ranks: int | None = None, env: dict | None = None, timeout: int = 600):
    """python launch/train.py ARGS, or `deepspeed --num_gpus RANKS launch/train.py ARGS` when ranks is set."""
    return subprocess.run(
        _command(args, ranks),
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def train_on_cpu(model_dir, data_file, output, *flags, **options) -> Path:
    """`python launch/train.py` on ds_configs/cpu.json with train_args' options, then `flags` (e.g.
    "--resume", "auto"); it must succeed. Returns the output folder."""
    args = train_args(REPO / "ds_configs" / "cpu.json", model_dir, data_file, output, **options)
    result = run_train([*args, *flags])
    assert result.returncode == 0, tail(result)
    return Path(output)


def start_train(args, *, env: dict | None = None) -> subprocess.Popen:
    """python launch/train.py ARGS in the background (its output in .stdout/.stderr pipes)."""
    return subprocess.Popen(
        _command(args, None),
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def metrics_by_step(output: Path) -> dict[int, dict]:
    """The last record of each step in metrics.jsonl (a resumed run logs its steps again)."""
    records = {}
    for line in (Path(output) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def tail(result) -> str:
    return (result.stdout + result.stderr)[-3000:]
