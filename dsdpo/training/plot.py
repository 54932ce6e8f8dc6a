"""Training and held-out curves of one or more runs side by side (`dsdpo plot RUN... --out F.png`).

Reads each run's metrics.jsonl (the last record of a step wins, as a resumed run logs its steps
again) and draws one panel per metric, one line per run. matplotlib is an optional extra
(`pip install 'dsdpo[plot]'`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dsdpo.errors import DsdpoError

# Drawn by default, with every eval/* metric a run logged (default_metrics)
TRAINING_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "drift/chosen")


def read_metrics(run: Path) -> dict[int, dict]:
    """step -> the last record logged for it; a line cut short by a crash is skipped."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise DsdpoError(f"{run}: no metrics.jsonl (give a run's output folder or its metrics file)")
    records = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records[record["step"]] = record
    if not records:
        raise DsdpoError(f"{path}: no metrics logged yet")
    return records


def curve(records: dict[int, dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order, where it was logged."""
    steps = sorted(step for step, record in records.items() if isinstance(record.get(metric), int | float))
    return steps, [float(records[step][metric]) for step in steps]


def default_metrics(logged: dict[Path, dict[int, dict]]) -> list[str]:
    """The training curves, then every held-out (eval/*) metric any run logged, in the order first
    logged: eval/accuracy, the curve a checkpoint is picked by, included."""
    held_out = dict.fromkeys(
        name
        for records in logged.values()
        for step in sorted(records)
        for name in records[step]
        if name.startswith("eval/")
    )
    return [*TRAINING_METRICS, *held_out]


def plot_runs(runs: Sequence[Path], out: Path, metrics: Sequence[str] = ()):
    """Write the figure to `out` and return it: a panel per metric that any run logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise DsdpoError("dsdpo plot needs matplotlib: pip install 'dsdpo[plot]'") from None
    logged = {Path(run): read_metrics(Path(run)) for run in runs}
    wanted = list(metrics) or default_metrics(logged)
    shown = [m for m in wanted if any(curve(records, m)[0] for records in logged.values())]
    if not shown:
        raise DsdpoError(f"none of the runs logged {', '.join(wanted)}")
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for panel, metric in zip(axes.flat, shown, strict=False):
        for run, records in logged.items():
            steps, values = curve(records, metric)
            if steps:
                panel.plot(steps, values, marker="o" if len(steps) < 20 else None, label=str(run))
        panel.set_title(metric)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
    for panel in list(axes.flat)[len(shown) :]:
        panel.set_visible(False)
    axes.flat[0].legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return figure
