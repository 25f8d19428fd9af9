"""Child processes die with the trainer: no orphans after kill -9, SIGTERM or a crash.

Two mechanisms, both in the kernel, so they work while the child is stuck in C code holding its GIL (a reward
worker in a 370-million-digit integer power: a Python watchdog thread never gets to run there):

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux): the kernel kills the child when its parent dies. Caveat: the
  "parent" is the *thread* that created the child, so create long-lived children from a thread that lives as
  long as they should (the trainer's main thread does).
* a lifeline pipe: the parent holds the write end and never writes; the child owns the read end with ``O_ASYNC``,
  so when the last write end closes (the parent exits, however) the kernel sends the child SIGIO, whose default
  action terminates it. No code in the child runs, so no GIL is needed. It covers what PDEATHSIG does not: a
  parent thread that exits, systems without prctl.

``children_die_with_parent()`` arms PDEATHSIG in every child *forked* while it is active: megatron's checkpoint
writer forks one writer process per file and must not outlive a killed trainer.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import signal
import sys
from collections.abc import Iterator

import psutil

_PR_SET_PDEATHSIG = 1
_fork_parent: int | None = None  # pid whose forked children must die with it (set by children_die_with_parent)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def arm_lifeline(fd: int) -> None:
    """Terminate this process (SIGIO, default action) when the write end of pipe ``fd`` is closed everywhere."""
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    poller = select.poll()  # closed before we armed it: no SIGIO will come
    poller.register(fd, select.POLLIN)
    if poller.poll(0):
        os._exit(1)


def die_with_parent(parent_pid: int, lifeline_fd: int | None = None) -> None:
    """Call first thing in a child: it is killed when ``parent_pid`` dies (and exits now if it already has)."""
    set_parent_death_signal()
    if lifeline_fd is not None:
        arm_lifeline(lifeline_fd)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _after_fork_in_child() -> None:
    if _fork_parent is not None:
        die_with_parent(_fork_parent)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def children_die_with_parent() -> Iterator[None]:
    """Every process forked (without exec) by this process inside the block gets a parent-death signal."""
    global _fork_parent
    previous, _fork_parent = _fork_parent, os.getpid()
    try:
        yield
    finally:
        _fork_parent = previous


@contextlib.contextmanager
def started_here() -> Iterator[set[int]]:
    """The pids of the processes (and their descendants) alive at the end of the block that were not before it.

    SGLang's ``Engine.shutdown`` kills *every* descendant of the caller (``kill_process_tree(os.getpid())``): the
    wandb service, reward workers, a loky pool. The set this yields is what it may kill instead (its schedulers and
    detokenizer, started in the block)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    started: set[int] = set()
    try:
        yield started
    finally:
        started.update(p.pid for p in me.children(recursive=True) if p.pid not in before)


def kill_trees(pids: set[int], timeout: float | None = None) -> None:
    """SIGKILL ``pids`` and everything below them, then wait up to ``timeout`` s until all are reaped (a CUDA
    context is freed only then); raises ``RuntimeError`` naming the survivors."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        raise RuntimeError(f"processes {[p.pid for p in alive]} still alive {timeout} s after SIGKILL")
