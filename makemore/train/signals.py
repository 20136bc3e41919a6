"""SIGTERM and SIGINT: stop at the end of the current step with a checkpoint; a second one stops at once.

SIGTERM is what SLURM, Kubernetes and torchrun send before they kill a job (torchrun waits 30 s,
then sends SIGKILL); SIGINT is Ctrl-C. The first only raises a flag: the loop finishes the step
it is in, every rank agrees to stop at the same step (distributed.agree), rank 0 writes the
checkpoint, and the loop raises ``Stopped``. A second signal raises ``Interrupted`` at once,
wherever the process is: a checkpoint being written is abandoned (checkpoint.save removes its
temporary file, the last whole one stays), and the lock is released on the way out. Signals
within BURST seconds of the first count as the first: one Ctrl-C under torchrun reaches each rank
twice (the terminal's SIGINT, and torchrun's SIGTERM as it passes the signal on).
"""

import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
BURST = 0.5  # seconds


class Stopped(Exception):
    """Training stopped on a signal after writing its checkpoint at ``step``."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class Interrupted(BaseException):
    """A second signal: stop at once (a BaseException, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


class Signals:
    """Within ``with Signals() as signals:``, ``signals.received`` is the first signal's number (0: none yet)."""

    def __init__(self):
        self.received = 0
        self._first = 0.0  # when the first signal came (time.monotonic)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.received:
            self.received, self._first = signum, time.monotonic()
        elif time.monotonic() - self._first > BURST:
            raise Interrupted(signum)
