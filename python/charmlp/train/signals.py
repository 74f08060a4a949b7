"""Ctrl-C and SIGTERM: stop after the current step (or chunk of steps) and write a
checkpoint first (the loop raises :class:`~charmlp.train.TrainingInterrupted`)."""

from __future__ import annotations

import signal
import threading
from typing import Callable


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into "stop after this step and checkpoint".

    Single process: a second Ctrl-C raises KeyboardInterrupt at once. Under torchrun
    (``distributed``) the handler stays for every further signal: torchrun forwards a
    terminal's Ctrl-C to workers that the terminal already signalled, and that second
    SIGINT must not abort the checkpoint; the ranks agree on the stop step at the next
    chunk boundary (:func:`_agree`), and torchrun's own ``--shutdown-timeout`` (30 s) is
    the hard stop. Only installed in the main thread (signals are delivered there).
    """

    def __init__(self, enabled: bool, notify: Callable[[str], None], distributed: bool = False):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.notify = notify
        self.distributed = distributed
        self.previous: dict = {}

    def _handler(self, signum, frame):
        first = not self.requested
        self.requested = True
        if self.distributed:
            if first:
                self.notify(f"\n{signal.Signals(signum).name}: stopping every rank at the end of "
                            f"the current chunk of steps and writing a checkpoint")
            return
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}
        self.notify(f"\n{signal.Signals(signum).name}: stopping after the current step(s) and writing a "
                    f"checkpoint (press Ctrl-C again to abort at once)")

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}
        return False
