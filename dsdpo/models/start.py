"""The models a training run starts from (--model, --ref-model): a Hugging Face folder as it is, or a
dsdpo checkpoint (a step_NNNNNN folder, or a run folder: its newest) as every other command takes one.

DeepSpeed's ZeRO-3 loads a model straight into partitions from a Hugging Face folder (transformers'
from_pretrained), so a checkpoint is first exported to a temporary one on each rank (`dsdpo export`:
one weight in memory at a time), in the run's precision, before DeepSpeed starts: its verification
(file digests, no pickled code unless --trust-checkpoint) fails at once, not after start-up. The folder
lives until the engines have loaded it. It takes the model's size on the local disk, per rank.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from dsdpo.config import ModelConfig
from dsdpo.runtime.checkpoint import is_checkpoint, resolve_checkpoint


@dataclasses.dataclass
class StartModels:
    """`with start_models as model_config:` the model settings whose paths the engines load."""

    model_config: ModelConfig
    notes: list[str]
    _exports: list[tempfile.TemporaryDirectory]

    @classmethod
    def of(cls, model: ModelConfig, precision: str, *, trust_checkpoint: bool = False) -> StartModels:
        """Export every checkpoint among `model`'s path and reference_path (once if both name it)."""
        from dsdpo.runtime.export import export_checkpoint

        folders: dict[str, str] = {}
        notes, exports = [], []
        for path in dict.fromkeys(p for p in (model.path, model.reference_path) if p):
            if (Path(path) / "config.json").is_file() or not is_checkpoint(path):
                continue
            checkpoint = resolve_checkpoint(path)
            export = tempfile.TemporaryDirectory(prefix="dsdpo-start-")
            export_checkpoint(
                checkpoint,
                export.name,
                dtype="bf16" if precision == "bf16" else "fp32",
                trust_checkpoint=trust_checkpoint,
            )
            folders[path] = export.name
            exports.append(export)
            notes.append(f"{path}: training starts from checkpoint {checkpoint} (exported to {export.name})")
        paths = {"path": folders.get(model.path, model.path)}
        if model.reference_path:
            paths["reference_path"] = folders.get(model.reference_path, model.reference_path)
        return cls(dataclasses.replace(model, **paths), notes, exports)

    def __enter__(self) -> ModelConfig:
        return self.model_config

    def __exit__(self, *exc) -> None:
        for export in self._exports:
            export.cleanup()
        self._exports.clear()
