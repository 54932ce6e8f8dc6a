"""--report-to (dsdpo/training/trackers.py) and the schedule options, end to end: one tiny run logs to W&B
(offline) and MLflow (its local database), and trackio where it is installed; each backend's own
files, read back with its own reader, hold what metrics.jsonl holds. The same run's learning rates
are checked against transformers' cosine schedule."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsdpo.config import TrainConfig
from dsdpo.errors import DsdpoError
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

PEAK, STEPS, WARMUP_RATIO = 1e-3, 8, 0.3  # warmup: ceil(0.3 × 8) = 3 steps
# The dev extra installs wandb and mlflow (CI runs them); trackio runs where it is installed.
NEEDS = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "trackio": ("trackio",)}
BACKENDS = [name for name, modules in NEEDS.items() if all(map(importlib.util.find_spec, modules))]


@pytest.fixture(scope="module")
def run(tiny_gemma_dir, tmp_path_factory) -> Path:
    """8 steps of 2 pairs from 8 pairs: --max-steps takes two epochs where --epochs says one."""
    folder = tmp_path_factory.mktemp("trackers")
    data = write_jsonl(addition_pairs(8, seed=3), folder / "pairs.jsonl")
    held_out_rows = [{**row, "id": f"held-{row['id']}"} for row in addition_pairs(4, seed=4)]
    held_out = write_jsonl(held_out_rows, folder / "held_out.jsonl")
    ds_config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds_config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    ds_config["optimizer"]["params"].update(lr="auto", weight_decay="auto")
    ds_config["scheduler"] = {"type": "auto"}
    (folder / "ds.json").write_text(json.dumps(ds_config))
    options = dict(
        max_steps=STEPS, log_every=2, budget=2, beta=0.5, eval_data=held_out, eval_every=4,
        learning_rate=PEAK, lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO, per_device_batch_size=1,
        gradient_accumulation_steps=2, report_to=",".join(BACKENDS) or "none",
    )  # fmt: skip
    output = folder / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(folder / "trackio")}
    env |= {f"WANDB_{name}_DIR": str(folder / "wandb-home") for name in ("CONFIG", "CACHE", "DATA")}
    result = run_train(train_args(folder / "ds.json", tiny_gemma_dir, data, output, **options), env=env)
    assert result.returncode == 0, tail(result)
    return output


def _logged(output: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl's numbers, step by step."""
    return {
        step: {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for step, record in metrics_by_step(output).items()
    }


def _wandb_history(output: Path) -> dict[int, dict[str, float]]:
    """The history records of the offline run's .wandb transaction log, printed by W&B's own reader
    (`wandb leet inspect`) as protobuf text and parsed into its Record messages."""
    from google.protobuf import text_format
    from wandb.proto import wandb_internal_pb2

    log_file = next((output / "wandb").glob("offline-run-*/run-*.wandb"))
    wandb = Path(sys.executable).with_name("wandb")
    text = subprocess.run(
        [str(wandb), "leet", "inspect", str(log_file)], capture_output=True, text=True, check=True
    ).stdout
    history = {}
    for block in re.split(r"^# record \d+: \w+\n", text, flags=re.MULTILINE)[1:]:
        record = text_format.Parse(block, wandb_internal_pb2.Record(), allow_unknown_field=True)
        if record.WhichOneof("record_type") == "history":
            row = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                for item in record.history.item
            }
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return history


def _mlflow_history(output: Path, names) -> dict[int, dict[str, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dsdpo").experiment_id])
    history: dict[int, dict[str, float]] = {}
    for name in names:
        for metric in client.get_metric_history(run.info.run_id, name):
            history.setdefault(metric.step, {})[name] = metric.value
    return history


def _trackio_history(output: Path) -> dict[int, dict[str, float]]:
    import os

    os.environ["TRACKIO_DIR"] = str(output.parent / "trackio")
    from trackio import SQLiteStorage

    rows = SQLiteStorage.get_logs("dsdpo", output.name)
    return {row["step"]: {k: v for k, v in row.items() if k not in ("step", "timestamp")} for row in rows}


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_holds_what_metrics_jsonl_holds(run, backend):
    logged = _logged(run)
    names = {name for metrics in logged.values() for name in metrics}
    read = {
        "wandb": lambda: _wandb_history(run),
        "mlflow": lambda: _mlflow_history(run, names),
        "trackio": lambda: _trackio_history(run),
    }[backend]()
    assert sorted(logged) == [0, 2, 4, 6, 8]  # step 0's evaluation, then every 2nd of 8 steps over 2 epochs
    assert {"eval/loss", "loss", "lr"} <= names
    flat = lambda history: {(s, k): v for s, metrics in history.items() for k, v in metrics.items()}  # noqa: E731
    assert flat(read) == pytest.approx(flat(logged), rel=1e-12)


def test_the_runs_rates_are_transformers_cosine_one_step_late_in_the_warmup(run):
    """The run's "lr" (the rate each step applied) against transformers.get_cosine_schedule_with_warmup
    with ceil(0.3 × 8) = 3 warmup steps: DeepSpeed's WarmupCosineLR steps after each update, so its
    warmup runs one step late (see test_ds_config_options.py); the decay is transformers' own."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=STEPS)
    reference = []
    for _ in range(STEPS):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    warmup = 3
    late = [reference[0], *reference[:warmup], *reference[warmup + 1 :]]  # the rate of steps 1..8
    logged = metrics_by_step(run)
    rates = {step: logged[step]["lr"] for step in (2, 4, 6, 8)}  # logged every 2nd step
    assert rates == pytest.approx({step: late[step - 1] for step in rates}, rel=1e-12, abs=1e-15)
    assert rates[2] == 0 and rates[4] == pytest.approx(PEAK * 2 / 3)  # transformers': 1/3 and the peak


def test_a_missing_backend_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(DsdpoError, match=r"^--report-to wandb needs wandb: pip install 'dsdpo\[wandb\]'$"):
        TrainConfig(report_to="tensorboard,wandb").validate()
