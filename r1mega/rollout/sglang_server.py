"""Start and stop an ``sglang.Engine`` inside a process that has other children to keep.

sglang 0.5.17's ``Engine.shutdown`` ends with ``kill_process_tree(os.getpid())``: it SIGKILLs *every* descendant of
the caller. In a trainer that is wandb's service, the reward workers, and megatron-core's checkpoint results queue
(a ``multiprocessing.Manager`` it forks once and keeps): the next ``dist_checkpointing.save`` then dies on a broken
pipe. The one home for that fix: ``start_engine`` records the processes the engine started, ``shutdown_engine``
runs SGLang's own shutdown with its kill confined to them. Every caller (the rollout engine, the tools) uses these.
"""

from __future__ import annotations

import atexit
import importlib
from typing import Any, Optional
from unittest import mock

from r1mega.procs import kill_trees, started_here

_PIDS_ATTR = "_r1mega_started_pids"


def import_sglang() -> Any:
    try:
        import sglang
    except ImportError as e:  # never part of the CPU install: the `sglang` extra, on the GPU machine
        raise ImportError("rollout=sglang needs SGLang (pip install 'r1mega[sglang]', GPU only)") from e
    return sglang


def start_engine(**kwargs: Any) -> Any:
    """``sglang.Engine(**kwargs)``, remembering its schedulers and detokenizer (what ``shutdown_engine`` may kill)."""
    sgl = import_sglang()
    with started_here() as pids:
        engine = sgl.Engine(**kwargs)
    setattr(engine, _PIDS_ATTR, pids)
    return engine


def shutdown_engine(engine: Any) -> None:
    """SGLang's own shutdown (it stops its schedulers cleanly first), its process kill confined to the processes
    ``start_engine`` saw it start; it also registered itself with atexit, where it would kill unconfined: undone."""
    pids: set[int] = getattr(engine, _PIDS_ATTR)
    sgl_engine = importlib.import_module("sglang.srt.entrypoints.engine")

    def kill_own(*_args: Any, wait_timeout: Optional[float] = None, **_kw: Any) -> None:
        kill_trees(pids, wait_timeout)

    with mock.patch.object(sgl_engine, "kill_process_tree", kill_own):
        engine.shutdown()
    atexit.unregister(engine.shutdown)
