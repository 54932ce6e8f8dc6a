"""The embedded default: a tiny model and a small synthetic preference set, for a first run.

The task is two-digit addition: the chosen answer is the sum; the rejected one is hedged and off by a
few ("about 57"). A tiny model learns the style within a minute (reward accuracy and margin rise);
learning the arithmetic itself takes a real model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dsdpo.models.tiny import init_tiny


def addition_pairs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append(
            {"id": f"add-{index}", "prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"about {wrong}"}
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_demo(folder: Path, *, pairs: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """(model folder, data file) of the demo, written under `folder` unless already there."""
    model_dir, data_file = folder / "tiny-model", folder / "addition.jsonl"
    if not (model_dir / "config.json").is_file():
        init_tiny(model_dir, seed=seed)
    if not data_file.is_file():
        write_jsonl(addition_pairs(pairs, seed), data_file)
    return model_dir, data_file
