"""When the RL loop saves, evaluates and stops: ``train.save_every`` / ``eval_every`` / ``max_minutes``.

One object answers "what is due after step N", so a new reason to save or stop is one method here (a
signal handler, later, calls :meth:`Cadence.request_stop`; the loop needs no change).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from r1mega.config import TrainConfig


@dataclass(frozen=True)
class Due:
    save: bool = False
    eval: bool = False
    stop: str = ""  # why the loop stops now ("" = it goes on)


@dataclass
class Cadence:
    train: TrainConfig
    started: float = field(default_factory=time.perf_counter)
    _stop_reason: str = ""

    def request_stop(self, reason: str) -> None:
        """Stop (and save, when a save_dir is set) after the current step."""
        self._stop_reason = self._stop_reason or reason

    def after(self, step: int) -> Due:
        """What to do once step ``step`` (0-based) has finished."""
        t, done = self.train, step + 1
        if t.max_minutes and (time.perf_counter() - self.started) / 60 > t.max_minutes:
            self.request_stop(f"train.max_minutes={t.max_minutes} reached")
        stop = self._stop_reason
        last = done >= t.steps  # the run's last step is always saved (when a save_dir is set)
        periodic = bool(t.save_every) and done % t.save_every == 0
        save = bool(t.save_dir) and (periodic or bool(stop) or last)
        evaluate = bool(t.eval_every) and done % t.eval_every == 0 and not last and not stop
        return Due(save=save, eval=evaluate, stop=stop)
