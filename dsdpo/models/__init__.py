"""Models from local folders: loading (models and tokenizers), start (checkpoints as starting
models), freeze (--freeze), padding (models that ignore the padding mask), tiny (tiny test models).

`from dsdpo.models import load_model` (and the other names of dsdpo.models.loading) keeps working;
the names are looked up on first use, so importing a submodule does not load transformers.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    loading = importlib.import_module("dsdpo.models.loading")
    if name.startswith("_") or not hasattr(loading, name):
        raise AttributeError(f"module 'dsdpo.models' has no attribute {name!r}")
    return getattr(loading, name)
