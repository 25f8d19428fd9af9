"""The memory report of a step, per phase: what the device holds after generation, log-probs and training.

CUDA: torch's allocated / reserved bytes and the device's free bytes (``mem_get_info``, which also sees what
SGLang's processes hold), and torch's peak allocation since the previous report (the peak counter is reset at
every report, so each phase's peak is its own: the first H200 run showed one cumulative 43.7 GB everywhere);
CPU: the process's resident set size (``/proc/self/statm``), where torch keeps no allocator statistics.
Also the hand-over of a colocated engine's memory (:class:`GpuHandover`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch

GB = 1e9


def memory_metrics(device: torch.device, phase: str) -> dict[str, float]:
    """``mem/<phase>/*`` for the step log."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        out = {
            f"mem/{phase}/allocated_gb": torch.cuda.memory_allocated(device) / GB,
            f"mem/{phase}/reserved_gb": torch.cuda.memory_reserved(device) / GB,
            f"mem/{phase}/free_gb": free / GB,
            f"mem/{phase}/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return {}
    return {f"mem/{phase}/rss_gb": rss / GB}


class EngineMemoryError(MemoryError):
    """A colocated engine cannot take its GPU memory back. Raised before the engine is asked, at the start of a
    step's generation, so the policy is still the previous step's: the RL loop saves it and stops (r1mega/train.py)."""


def device_free_bytes() -> Optional[int]:
    """The driver's free bytes on this process's GPU (every process counted, SGLang's schedulers too); None on CPU."""
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


class GpuHandover:
    """The bytes a colocated engine hands to the trainer between generations, and the check before it takes them
    back.

    Two things keep a resume from failing in SGLang's scheduler process (where an out-of-memory kills the whole
    job, trainer included, with no checkpoint: an H100 run of 2026-12-06, docs/perf/e2e.md):

    - before a resume, torch's cached blocks go back to the driver (``empty_cache``): the trainer's allocator kept
      43 GB reserved for a 24 GB training peak (microbatches of varying length fragment it), which with SGLang's
      40 GB is more than an 80 GB card.
    - if the device still has less free than the engine released, the resume cannot succeed (the memory saver
      maps back exactly the physical bytes it unmapped): an :class:`EngineMemoryError` here, in the trainer's
      process, names the settings to change and ends the run like a stop: the checkpoint of the last step, then the
      teardown (wandb, engine).

    ``free_bytes`` is injectable for the CPU tests; with it None (the CPU) nothing is measured or checked.
    """

    def __init__(self, what: str, fix: str, free_bytes: Optional[Callable[[], Optional[int]]] = None) -> None:
        self.what, self.fix = what, fix
        self.free_bytes = free_bytes or device_free_bytes  # looked up here: the tests replace the module's
        self.owed = 0  # bytes released and not yet taken back

    def release(self, do: Callable[[], None]) -> None:
        before = self.free_bytes()
        do()
        after = self.free_bytes()
        if before is not None and after is not None:
            self.owed += max(0, after - before)

    def resume(self, do: Callable[[], None], *, rest: bool = True) -> None:
        """``rest``: this resume takes back everything still released, so it needs all that is owed; a partial one
        (SGLang's weights alone, before a push) is not checked, as its share of the release is not known (it was
        released with the rest in one call) and the trainer may still free memory before the rest comes back
        (``train.offload_optimizer_during_rollout``)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        before = self.free_bytes()
        if rest and before is not None and before < self.owed:
            raise EngineMemoryError(
                f"{self.what}: cannot take its GPU memory back: it needs {self.owed / GB:.2f} GB and the device has "
                f"{before / GB:.2f} GB free after the trainer's cache was emptied (torch holds "
                f"{_reserved_gb():.2f} GB). {self.fix}"
            )
        do()
        after = self.free_bytes()
        if before is not None and after is not None:
            self.owed = max(0, self.owed - max(0, before - after))


def _reserved_gb() -> float:
    return torch.cuda.memory_reserved() / GB if torch.cuda.is_available() else 0.0
