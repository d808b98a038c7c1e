"""How a run stops before its end: interrupted (it saves and stays resumable) or diverged (it does not save).

Ctrl-C raises `KeyboardInterrupt`; inside `sigterm_interrupts()` SIGTERM (a scheduler's pre-emption,
`kill`) raises `Terminated`, a kind of it, so both take the same path. `NonFiniteLoss` is raised
before a NaN or infinite loss or gradient reaches the weights.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from moondream2.errors import UserInputError


class NonFiniteLoss(UserInputError):
    """The loss or gradient norm became NaN or infinite: the run stopped before the weights took it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, `kill`), handled as Ctrl-C so the run stays resumable."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Raise `Terminated` on SIGTERM while training; later ones are ignored so the save can finish."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
