"""The RL loop's cadence: periodic saves and evals, the final save, and a stop (time budget or requested) that
saves before it ends the loop."""

from __future__ import annotations

from r1mega.cadence import Cadence, Due
from r1mega.config import TrainConfig


def _run(cadence: Cadence, steps: int) -> list[tuple[int, Due]]:
    out = []
    for step in range(steps):
        due = cadence.after(step)
        out.append((step, due))
        if due.stop:
            break
    return out


def test_periodic_save_eval_and_final_save():
    t = TrainConfig(steps=5, save_every=2, eval_every=2, save_dir="/ckpt")
    got = _run(Cadence(t), t.steps)
    assert [s for s, d in got if d.save] == [1, 3, 4]  # every 2nd step, and the last one
    assert [s for s, d in got if d.eval] == [1, 3]  # never on the last step: the final eval follows the loop
    assert not any(d.stop for _, d in got)
    assert not any(d.save for _, d in _run(Cadence(TrainConfig(steps=5, save_every=2)), 5))  # no save_dir


def test_time_budget_and_requested_stop_save_then_stop():
    t = TrainConfig(steps=100, max_minutes=1.0, save_dir="/ckpt")
    cadence = Cadence(t, started=0.0)  # perf_counter() is far beyond one minute after 0
    (only,) = _run(cadence, t.steps)
    assert only[0] == 0 and only[1].save and "train.max_minutes=1.0" in only[1].stop
    cadence = Cadence(TrainConfig(steps=100, save_dir="/ckpt"))
    assert cadence.after(0) == Due()
    cadence.request_stop("SIGTERM")  # what a signal handler will call
    cadence.request_stop("later reason")  # the first reason is kept
    assert cadence.after(1) == Due(save=True, eval=False, stop="SIGTERM")
