"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM set a flag the training loop checks between steps."""
from __future__ import annotations

import signal

__all__ = ["StopFlag"]


class StopFlag:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's or mpiexec's stop) set a flag that the loop checks
    between steps; a second one aborts at once. With ``immediate`` set (a stage with no step to stop
    after, like the final test evaluation) the first one aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.immediate = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested or self.immediate:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: Ctrl-C handling is the caller's business
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
