"""Stop requests from signals: SIGTERM (scancel, preemption, requeue), SIGINT (Ctrl-C), SIGUSR1 (Slurm's
``--signal=B:USR1@N`` before the time limit, forwarded by slurm/train.sbatch).

The handlers only record the signal; the training loop polls :attr:`StopSignals.should_stop` between steps and
then checkpoints and exits cleanly, in the time Slurm leaves (KillWait after SIGTERM, N seconds after SIGUSR1).
A signal may reach only some ranks, so the loop must agree on stopping across ranks (an all-reduce of the flag)
before it acts. A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Context manager: while active, the signals in ``signals`` set :attr:`should_stop` instead of killing the
    process; on exit the previous handlers come back. Outside the main thread (where Python cannot install
    handlers) it installs nothing and :attr:`installed` is False."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: list[int] = []  # every stop signal, in arrival order
        self.installed = False
        self._previous: dict[int, object] = {}

    @property
    def should_stop(self) -> bool:
        return bool(self.received)

    @property
    def signal_name(self) -> str | None:
        """Name of the first stop signal received (``"SIGTERM"``), or None."""
        return signal.Signals(self.received[0]).name if self.received else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again = signum in self.received
        self.received.append(signum)
        if again and signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.installed = False
