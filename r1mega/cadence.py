"""When the RL loop saves, evaluates and stops: ``train.save_every`` / ``eval_every`` / ``max_minutes`` /
``max_bad_steps``, and stop requests (a signal: :mod:`r1mega.signals`).

One object answers "what is due after step N", so a new reason to save or stop is one method here; the loop
needs no change.
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
    status: int = 0  # the process exit status that stop means (0: a planned stop such as max_minutes)


@dataclass
class Cadence:
    train: TrainConfig
    started: float = field(default_factory=time.perf_counter)
    bad_in_row: int = 0  # consecutive steps the step guard skipped (logged as train/bad_steps)
    _stop_reason: str = ""
    _status: int = 0

    def request_stop(self, reason: str, status: int = 0) -> None:
        """Stop (and save, when a save_dir is set) after the current step; the first request wins."""
        if not self._stop_reason:
            self._stop_reason, self._status = reason, status

    def count_step(self, skipped: bool) -> int:
        """Count a step whose optimizer update the step guard skipped (non-finite loss or gradient, see
        ``MegatronEngine._step_if_finite``); ``train.max_bad_steps`` in a row stop the run with exit status 1
        (the weights are those of the last finite update, so the stop still saves). Returns the current run."""
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        n = self.train.max_bad_steps
        if n and self.bad_in_row >= n:
            self.request_stop(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient and were skipped "
                f"(train.max_bad_steps={n}); the weights are those of the last finite update. Lower optim.lr (or "
                "optim.clip_grad) and resume",
                status=1,
            )
        return self.bad_in_row

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
        return Due(save=save, eval=evaluate, stop=stop, status=self._status if stop else 0)
