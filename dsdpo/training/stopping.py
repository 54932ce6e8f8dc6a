"""Stopping a run before its last step: on request (SIGINT/SIGTERM stop it at the next step boundary,
a second one at once), or after --max-bad-steps non-finite steps in a row.

The loop asks StopRequest before every step; TrainingStopped then reports the checkpoint it saved.
"""

from __future__ import annotations

import signal
from pathlib import Path

from dsdpo.errors import DsdpoError


class TrainingStopped(Exception):
    """Raised after a stop request (Ctrl-C, SIGTERM) once the checkpoint of the last step is saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped; resume with --resume auto (or --resume {checkpoint})")
        self.checkpoint = checkpoint


class StoppedAtOnce(DsdpoError):
    """A second stop request: the step in progress is abandoned (a checkpoint being written stays a
    .partial folder that nothing reads)."""

    def __init__(self):
        super().__init__(
            "stopped at once by a second signal: the step in progress is lost; --resume auto "
            "continues from the last checkpoint"
        )


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary and save; a second one of either
    stops at once (a step can take minutes, and a scheduler's SIGTERM is often followed by SIGKILL)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, _signum, _frame):
        if self.requested:
            raise StoppedAtOnce
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TooManyBadSteps(DsdpoError):
    """--max-bad-steps steps in a row had a non-finite loss or gradient (the loop saved first: the
    skipped steps changed no weight)."""

    def __init__(self, count: int, step: int):
        super().__init__(
            f"{count} steps in a row had a non-finite loss or gradient (step {step}); "
            "the weights were not updated by them. Lower the learning rate, or check the data"
        )
