"""SIGTERM during training: what a cluster scheduler or ``kill`` sends. It is turned into an
exception in the main thread, so the trainer saves a checkpoint as it does on Ctrl-C."""

from __future__ import annotations

import signal
import threading


class SigTerm(BaseException):
    """Raised in the main thread by SIGTERM during training, caught like Ctrl-C."""


def raise_terminated(signum, frame):
    raise SigTerm()


def on_sigterm(handler):
    """Install a SIGTERM handler (main thread only); returns the previous one (None elsewhere)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)
