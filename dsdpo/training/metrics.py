"""What a run reports: a progress bar, metrics.jsonl, and the --report-to backends (dsdpo.training.trackers:
TensorBoard where installed, by default).

Only rank 0 writes; the other ranks get a logger that does nothing.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from dsdpo.training.trackers import open_trackers


def peak_memory_mb() -> float:
    """Peak accelerator memory where there is one, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class RunLogger:
    """Rank 0's progress bar and metric files; `enabled=False` makes every call a no-op."""

    BAR_FIELDS: ClassVar[dict[str, str]] = {
        "loss": "loss",
        "rewards/accuracies": "acc",
        "rewards/margins": "margin",
        "pairs_per_s": "pairs/s",
        "tokens_per_s": "tok/s",
        "peak_memory_mb": "mem_mb",
        "sweeps": "sweeps",  # and the resource monitor's (dsdpo/planner/monitor.py):
        "cpu_memory_mb": "cpu_mb",
        "nvme_read_mb": "nvme_r_mb",
    }

    def __init__(
        self,
        output: Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        report_to: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ):
        """`report_to`: the --report-to backends (dsdpo.training.trackers), given the run's `config`."""
        self.enabled = enabled
        if not enabled:
            return
        self.metrics_file = (output / "metrics.jsonl").open("a")
        self.bar = tqdm(
            total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True
        )
        self.trackers = open_trackers(list(report_to), output, config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        scalars = {name: value for name, value in metrics.items() if isinstance(value, int | float)}
        for tracker in self.trackers:
            tracker.log(step, scalars)
        self.bar.set_postfix(
            {short: f"{metrics[name]:.4g}" for name, short in self.BAR_FIELDS.items() if name in metrics},
            refresh=False,
        )

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics_file.close()
        for tracker in self.trackers:
            tracker.close()


class DisplacementMonitor:
    """Warns once when the chosen responses' likelihood falls steadily below the reference's while
    the margin grows (likelihood displacement, Razin et al. 2024; Pal et al. 2024): the policy then
    wins pairs by pushing both responses down, often an early sign of over-optimisation."""

    def __init__(self, window: int = 5):
        self.window = window
        self.history: list[tuple[float, float]] = []  # (drift/chosen, rewards/margins) per logged step
        self.warned = False

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        if self.warned or "drift/chosen" not in metrics:
            return None
        self.history = [*self.history, (metrics["drift/chosen"], metrics["rewards/margins"])][-self.window :]
        drifts = [drift for drift, _ in self.history]
        falling = all(later < earlier for earlier, later in itertools.pairwise(drifts))
        widening = self.history[-1][1] > self.history[0][1]
        if len(self.history) < self.window or not (falling and widening and drifts[-1] < 0):
            return None
        self.warned = True
        return (
            f"warning: at step {step} the chosen responses' ELBO has fallen for {self.window} logged steps "
            f"({drifts[-1]:.2f} nats below the reference) while the margin grew: likelihood displacement. "
            "--chosen-floor or --sft-weight keep the chosen likelihood up"
        )
