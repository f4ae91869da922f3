"""Stop requests: SIGTERM/SIGUSR1 and the RUN_DIR/STOP file finish the step, checkpoint, exit 0."""
from __future__ import annotations

import contextlib
import signal
from typing import Optional

STOP_FILE = "STOP"  # RUN_DIR/STOP: finish the step, checkpoint, exit 0 (slurm/train.sbatch touches it)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag while training; :meth:`restore` puts the previous
    handlers back, so a process that called :func:`train` (a test, a notebook) can still be
    terminated afterwards -- and so can the processes it forks (a multiprocessing pool's
    ``terminate`` sends SIGTERM)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, frame):
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded_children():
    """Processes started inside (DataLoader workers) inherit SIGTERM/SIGUSR1 *blocked*.

    Slurm and torchrun signal every process of a task, and a DataLoader
    worker dies of SIGTERM (torch installs a handler that re-raises it),
    which would crash the rank instead of letting it checkpoint.  A blocked
    signal stays pending in the worker until the rank shuts it down; in this
    thread it is only deferred to the end of the block, never lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

