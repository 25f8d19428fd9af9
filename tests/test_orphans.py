"""No orphans (issue 14, fault 5): kill -9 or SIGTERM of a trainer whose reward workers are busy in big-integer
arithmetic and which is writing a checkpoint leaves no process of the run after 5 s (checked in /proc, as ps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    """ppid -> [pid] of every live (non-zombie) process, from /proc (what `ps -eo pid,ppid,stat` shows)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                out.setdefault(int(fields[1]), []).append(int(d.name))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pids: set[int]) -> set[int]:
    live = {p for ps in _children().values() for p in ps}
    return pids & live


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
def test_no_process_of_the_run_survives_the_trainer(tmp_path, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe nobody reads: the driver must never block
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.orphan_driver", str(tmp_path / "ckpt")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    run: set[int] = set()
    try:
        workers = {int(p) for p in proc.stdout.readline().split()[1:]}
        saved = proc.stdout.readline()
        assert len(workers) == 2 and saved == "saved\n", (tmp_path / "driver.log").read_text()[-3000:]
        # wait until megatron's writer processes (forked: the trainer's own command line) are writing a checkpoint
        trainer_cmd, deadline, writers = _cmdline(proc.pid), time.monotonic() + 60, set()
        while not writers and time.monotonic() < deadline:
            writers = {p for p in _descendants(proc.pid) if _cmdline(p) == trainer_cmd}
        assert writers, "no checkpoint writer process seen"
        assert _alive(workers) == workers  # busy on the power tower, not finished
        run = _descendants(proc.pid)
        os.kill(proc.pid, sig)
        time.sleep(5.0)
        left = _alive(run)
        info = {p: _cmdline(p)[:120] for p in left}
        assert not left, f"left after 5 s: {info} (workers {workers}, writers {writers})"
    finally:  # a failed run must not leave its orphans on the box either
        run |= _descendants(proc.pid)
        proc.kill()
        proc.wait()
        for p in _alive(run):
            os.kill(p, signal.SIGKILL)


BUSY_CHILD = """
import os, sys
from r1mega.procs import arm_lifeline
arm_lifeline(int(sys.argv[1]))
print("armed", flush=True)
x = pow(7, 10**9)  # one C call, minutes long, GIL held throughout: no Python-level watchdog could run
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_ASYNC pipes + /proc")
def test_lifeline_kills_a_child_busy_in_big_integer_arithmetic():
    """The GIL-free pipe-closed check on its own (no parent-death signal): closing the write end kills the child."""
    r, w = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", BUSY_CHILD, str(r)], pass_fds=(r,), env=env, stdout=subprocess.PIPE)
    os.close(r)
    try:
        assert child.stdout.readline() == b"armed\n"
        time.sleep(0.5)
        assert child.poll() is None  # busy, alive
        t0 = time.monotonic()
        os.close(w)  # what the kernel does to every fd when the parent dies
        assert child.wait(timeout=5) == -signal.SIGIO and time.monotonic() - t0 < 2
    finally:
        child.kill()
        child.wait()
