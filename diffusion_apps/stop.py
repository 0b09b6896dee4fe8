"""Stop requests: SIGTERM (a preempted job) or Ctrl-C asks a run to stop at its next safe point.

The signal handler only sets a flag; the long loops (each sampler step, each batch of
``sample``/``eval``, each training and validation batch) call :func:`check`, which raises
:class:`StopRequested` once a stop is asked for. The run stops within one step wherever it is
(a validation grid of 64 DDIM-50 samples included), and whoever catches the exception writes
what there is to write: ``fit`` saves ``last`` (:class:`~diffusion_apps.callbacks.Checkpoint`).
A second Ctrl-C raises KeyboardInterrupt at once; SIGTERM stays graceful until the SIGKILL that
follows a grace period.

Pure Python at the bottom layer, so that the samplers can check it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None  # the signal that asked for a stop
_installed = False  # on_signals' handlers are in place


class StopRequested(SystemExit):
    """A signal asked the run to stop; raised by :func:`check` at the next safe point.

    A SystemExit whose code is 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), the code a
    shell gives a process ended by that signal: a script (``make demo``) stops there instead of
    going on with a half-trained model, and the process exits with it unless caught.

    Args:
        signum: the signal.
        done: what was finished before the stop, for the message.
    """

    def __init__(self, signum: int, done: str = "") -> None:
        super().__init__(128 + signum)
        self.signum, self.done = signum, done

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}" + (f": {self.done}" if self.done else "")


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signum).name


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop, as the signal ``signum`` does; the first request is the one kept."""
    global _requested
    if _requested is None:
        _requested = int(signum)


def requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _requested


def clear() -> None:
    """Forget a request (a new run in the same process starts without one)."""
    global _requested
    _requested = None


def check() -> None:
    """Raise :class:`StopRequested` if a stop was asked for; else nothing (a global read)."""
    if _requested is not None:
        raise StopRequested(_requested)


def _handler(signum: int, frame) -> None:
    if signum == signal.SIGINT and _requested is not None:
        raise KeyboardInterrupt  # the second Ctrl-C: now
    first = _requested is None
    request(signum)
    if first:  # os.write: a print here could re-enter a print the signal interrupted
        again = " (Ctrl-C again: at once)" if signum == signal.SIGINT else ""
        os.write(2, f"\n{signal_name(signum)}: stopping at the next step{again}\n".encode())


@contextmanager
def on_signals() -> Iterator[bool]:
    """SIGINT and SIGTERM request a stop (:func:`request`) instead of ending the process, while
    in this context; the previous handlers come back after it, and the request is cleared on
    the way in and out. Nested contexts are the outermost one. A signal the process ignores
    (``nohup``) stays ignored. Python runs handlers in the main thread only: elsewhere, nothing.

    Yields:
        Whether this context installed the handlers (False when nested or off the main thread).
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    clear()
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _handler)
    _installed = True
    try:
        yield True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _installed = False
        clear()
