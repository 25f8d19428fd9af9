"""Run identity: one job per ``logging.out_dir`` (a lock file), and one run id across restarts and requeues.

* ``<out_dir>/run.lock``: held with ``flock`` for the whole run, and holding the holder's pid, host and run id.
  A second job in the same folder stops at once with a message naming the first job's pid and host. A lock left
  by a job that died is not held any more (the kernel drops a dead process's flock), so the next job takes it
  over; its content only serves the messages. The file is never deleted (deleting a flock file races with the
  next job's open).
* the run id (also the wandb run id) is stored in ``<out_dir>/run_id`` and, when there is one, in
  ``<train.save_dir>/run_id``: a requeued or resumed job finds it and continues the same wandb run
  (``resume="allow"``) and the same metrics.jsonl (rows carry the id).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from r1mega.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
RUN_ID_NAME = "run_id"


class RunLockError(ConfigError):
    """Another live job owns this out_dir (a ConfigError: r1mega-train reports it in one line, exit status 2)."""


class RunLock:
    """An exclusive, kernel-released lock on ``<out_dir>/run.lock``; use as a context manager or call release()."""

    def __init__(self, out_dir: str | os.PathLike, run_id: str = "") -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = self._read()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            who = f"pid {previous.get('pid', '?')} on host {previous.get('host', '?')}"
            run = f"run {previous.get('run_id')!r}, since {previous.get('started', '?')}"
            raise RunLockError(
                f"logging.out_dir={str(Path(out_dir))!r} is in use by another job ({who}, {run}); give this job its "
                "own logging.out_dir, or stop that job first"
            ) from None
        self.previous = previous  # a lock file a dead job left behind: it no longer holds the flock
        if previous.get("pid"):
            logger.warning(
                "taking over %s left by pid %s on host %s (run %r), which no longer holds it",
                self.path,
                previous["pid"],
                previous.get("host"),
                previous.get("run_id"),
            )
        self.write(run_id)

    def _read(self) -> dict:
        try:
            text = os.pread(self._fd, 4096, 0).decode("utf-8", "replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def write(self, run_id: str) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": run_id,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def new_run_id() -> str:
    """8 lowercase alphanumerics, the form wandb generates."""
    return uuid.uuid4().hex[:8]


def resolve_run_id(out_dir: str | os.PathLike, save_dir: str | os.PathLike | None = None) -> str:
    """The run id stored by an earlier attempt of this run (save_dir first: it is what a resume continues), or
    a new one; stored in both places so the next attempt finds it."""
    places = [Path(p) / RUN_ID_NAME for p in (save_dir, out_dir) if p]
    run_id = next((p.read_text().strip() for p in places if p.is_file() and p.read_text().strip()), None)
    run_id = run_id or new_run_id()
    for p in places:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text().strip() != run_id:
            p.write_text(run_id + "\n")
    return run_id


class RunIdentity:
    """The lock and the run id of one job, taken by the main rank before anything expensive starts."""

    def __init__(self, out_dir: str, save_dir: str | None = None, enabled: bool = True) -> None:
        self.lock: RunLock | None = None
        self.run_id = ""
        if not enabled:
            return
        self.lock = RunLock(out_dir)
        try:
            self.run_id = resolve_run_id(out_dir, save_dir)
            self.lock.write(self.run_id)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunIdentity:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
