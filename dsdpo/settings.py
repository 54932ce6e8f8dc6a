"""The `setting` field helper of every settings dataclass (dsdpo.config's sections and
dsdpo.objective.loss_config.LossConfig): a default with its help, flag and choices beside it.

A leaf module: dsdpo.config imports LossConfig, so the helper cannot live in dsdpo.config without
loss_config importing that package back (a cycle).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any = None, help: str = "", *, flag: str | None = None, choices=None, **kwargs):
    """A config field with its command-line help beside it (dsdpo.cli.train builds the options):
    `flag` when it is not --field-name (--no-field-name for a bool that defaults to True), `choices`
    read from the code that implements them. The one place a setting's default is written."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    if "default_factory" in kwargs:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)
