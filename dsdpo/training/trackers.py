"""Where a run's metrics go besides metrics.jsonl (`--report-to`): one small interface, one adapter
per backend, each imported only when asked for (Hugging Face's `report_to`).

Offline use: TensorBoard writes event files in --output/tensorboard; W&B follows WANDB_MODE (offline:
files in --output/wandb, `wandb sync` later); MLflow logs to MLFLOW_TRACKING_URI, else to the SQLite
database --output/mlflow.db; trackio keeps its local store (TRACKIO_DIR).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

from dsdpo.errors import DsdpoError


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, output: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dsdpo"), name=output.name, dir=str(output), config=config
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, output: Path, config: dict[str, Any]):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's local database (its file store now refuses new runs by default)
            mlflow.set_tracking_uri(f"sqlite:///{(output / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dsdpo"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=output.name)
        mlflow.log_params(_flat(config))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio:
    def __init__(self, output: Path, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dsdpo"), name=output.name, config=config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


# --report-to name -> (adapter, the module it imports, the dsdpo extra that installs it)
TRACKERS = {
    "tensorboard": (TensorBoard, "tensorboard", "tensorboard"),
    "wandb": (WandB, "wandb", "wandb"),
    "trackio": (Trackio, "trackio", "trackio"),
    "mlflow": (MLflow, "mlflow", "mlflow"),
}


def check_installed(names: list[str]) -> None:
    """Each backend asked for is importable: refused in one line before the run starts."""
    for name in names:
        _, module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise DsdpoError(f"--report-to {name} needs {module}: pip install 'dsdpo[{extra}]'")


def open_trackers(names: list[str], output: Path, config: dict[str, Any]) -> list[Tracker]:
    check_installed(names)
    return [TRACKERS[name][0](output, config) for name in names]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (MLflow's parameters are flat)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
