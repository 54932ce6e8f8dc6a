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


def run_train(args, *, ranks: int | None = None, env: dict | None = None, timeout: int = 600):
    """python launch/train.py ARGS, or `deepspeed --num_gpus RANKS launch/train.py ARGS` when ranks is set."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("RANK", None)  # the in-process tests' single-rank group must not leak in
    environment.pop("WORLD_SIZE", None)
    environment.pop("LOCAL_RANK", None)
    environment.pop("MASTER_PORT", None)
    script = [str(REPO / "launch" / "train.py"), *map(str, args)]
    if ranks is None:
        command = [sys.executable, *script]
    else:
        command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), *script]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def metrics_by_step(output: Path) -> dict[int, dict]:
    """The last record of each step in metrics.jsonl (a resumed run logs its steps again)."""
    records = {}
    for line in (Path(output) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def tail(result) -> str:
    return (result.stdout + result.stderr)[-3000:]
