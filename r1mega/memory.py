"""The memory report of a step, per phase: what the device holds after generation, log-probs and training.

CUDA: torch's allocated / reserved bytes and the device's free bytes (``mem_get_info``, which also sees what
SGLang's processes hold), and torch's peak allocation since the previous report (the peak counter is reset at
every report, so each phase's peak is its own: the first H200 run showed one cumulative 43.7 GB everywhere);
CPU: the process's resident set size (``/proc/self/statm``), where torch keeps no allocator statistics.
"""

from __future__ import annotations

import os

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
