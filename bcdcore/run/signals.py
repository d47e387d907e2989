"""SIGTERM/SIGINT during a run: the first finishes the round and checkpoints, a second stops at once.
"""
from __future__ import annotations

import signal


class Signals:
    """First SIGTERM/SIGINT: finish the current round, checkpoint, stop. Second: stop at once."""

    def __init__(self, repeat_stops: bool = True) -> None:
        self.received: int | None = None
        self.second: int | None = None  # the signal that cut the round short
        self.previous = {}
        # A rank of a distributed run gets the same signal twice (from the terminal's process group and
        # forwarded by the launcher): there a second signal does not cut the round short.
        self.repeat_stops = repeat_stops

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if self.repeat_stops:
                self.second = signum
                raise KeyboardInterrupt
            return
        self.received = signum
