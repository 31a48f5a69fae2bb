"""Stopping a long job on SIGINT or SIGTERM with one line and an exit status, after saving its state.

A job (synthesis, distillation) catches ``KeyboardInterrupt``, saves what it
finished, and raises :class:`RunInterrupted` with the one line to show (e.g.
``"interrupted after 3/8 batches; re-run the same command to resume"``). Under
:func:`sigterm_as_interrupt` (the ``diode`` command runs every subcommand under
it) SIGTERM raises ``RunInterrupted`` too, so both signals take the same path;
the command prints the line and exits with :attr:`RunInterrupted.exit_code`
(130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving what it finished.

    ``str(error)`` is the one line to show the user; a command exits with
    :attr:`exit_code` (``128 + signum``: 130 for SIGINT, 143 for SIGTERM).

    Args:
        message: e.g. ``"interrupted after 3/8 batches; re-run the same command to resume"``.
        signum: the signal that stopped the run.
    """

    def __init__(self, message: str = "interrupted", *, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the shell's convention for a process ended by a signal."""
        return 128 + self.signum


def signal_number(error: BaseException) -> int:
    """The signal behind a ``KeyboardInterrupt``: its ``signum`` when it has one, else SIGINT."""
    return int(getattr(error, "signum", signal.SIGINT))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Meanwhile, SIGTERM raises :class:`RunInterrupted` (``signum`` 15) in the main thread, like Ctrl-C.

    Jobs then clean up on SIGTERM exactly as on SIGINT. Outside the main thread
    (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise RunInterrupted("terminated", signum=signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
