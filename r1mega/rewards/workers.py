"""The reward scorer's worker processes: the spawned verify loop and the parent's handle on each worker.

:class:`r1mega.rewards.scorer.RewardScorer` owns the pool, the timeouts and the cache (its docstring says why
verification runs in killable processes); this module is what runs in them and how one is stopped.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
import traceback
from collections import deque
from typing import Any

from r1mega.procs import die_with_parent

# The first math-verify call in a process pays ~1 s of lazy imports (sympy, the LaTeX parser): paid at start-up.
_WARMUP = (("\\frac{1}{2}", "0.5"), ("\\sqrt{8}", "2\\sqrt{2}"), ("(3,4]", "(3, 4]"), ("x=5", "5"))


def _load_fn(path: str):
    """Import ``"package.module:function"``."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"verify_fn={path!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def worker_main(conn, verify_fn: str, parent_pid: int, lifeline) -> None:
    """Worker loop: receive ``[(key, pred, gold), ...]``, send ``(key, ok, value)`` back for each item, in order.

    The parent owns the timeout (it kills this process), so math-verify's own alarm is switched off here.
    The worker dies with its parent through the kernel (:func:`r1mega.procs.die_with_parent`: a parent-death
    signal and the ``lifeline`` pipe), not a watchdog thread: a worker busy in big-integer arithmetic holds
    the GIL for minutes, and such a thread would never run.
    """
    die_with_parent(parent_pid, lifeline.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the workers
    try:
        from r1mega.rewards import math as rmath

        rmath.USE_MATH_VERIFY_ALARM = False
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" / parse warnings
        fn = _load_fn(verify_fn)
        # The first math-verify call in a process pays ~1 s of lazy imports (sympy, the LaTeX parser); pay it
        # before reporting ready so that a cold replacement worker does not time out on its first sample.
        for pred, gold in _WARMUP:
            rmath.is_equivalent(pred, gold)
    except BaseException:  # noqa: BLE001 - report any start-up failure to the parent
        conn.send(("fail", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for key, pred, gold in msg:
            try:
                conn.send((key, True, bool(fn(pred, gold))))
            except Exception as e:  # noqa: BLE001 - a verifier error costs only this sample
                conn.send((key, False, f"{type(e).__name__}: {e}"[:300]))


class Worker:
    __slots__ = ("proc", "conn", "lifeline", "ready", "started", "inflight", "deadline", "dead")

    def __init__(self, proc, conn, lifeline) -> None:
        self.proc = proc
        self.conn = conn
        self.lifeline = lifeline  # write end of the worker's lifeline pipe: never written, closed when we exit
        self.ready = False
        self.started = time.monotonic()
        self.inflight: deque[int] = deque()
        self.deadline = float("inf")
        self.dead = False


def stop_workers(workers: list[Worker], graceful: bool = True) -> None:
    for w in workers:
        if graceful and w.proc.is_alive() and not w.inflight:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
    for w in workers:
        if graceful:
            w.proc.join(timeout=0.5)
        kill_worker(w)
    workers.clear()


def kill_worker(w: Worker) -> None:
    """Kill a worker process (a no-op if it already exited) and close its pipe."""
    if w.proc.is_alive():
        w.proc.kill()
    w.proc.join(timeout=2.0)
    for c in (w.conn, w.lifeline):
        try:
            c.close()
        except OSError:
            pass
