"""Crash injection for recovery tests: the process kills itself (SIGKILL) at a named point.

DSDPO_FAULT=after_save:6  dies right after checkpoint step 6 is complete
DSDPO_FAULT=in_save:8     dies while checkpoint step 8 is half written (shards on disk, not marked)
DSDPO_FAULT=after_step:5  dies after optimizer step 5, before any checkpoint of it

A real SIGKILL at an exact point makes "nothing is lost on a crash" testable without timing races.
Unset (always, outside tests), this does nothing.
"""

from __future__ import annotations

import os
import signal


def crash_point(point: str, step: int) -> None:
    if os.environ.get("DSDPO_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
