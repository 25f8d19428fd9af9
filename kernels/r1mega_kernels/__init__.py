"""r1mega's Triton kernels for GRPO: per-token log-prob + entropy, the GRPO loss with its gradient made in the
forward, and a chunked fused linear + log-prob. All vocab-parallel over a tensor-parallel group.

The trainer calls :func:`available` to pick this GPU path over its plain-PyTorch reference.
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """True when the kernels can run: Triton importable and a CUDA device present, or TRITON_INTERPRET=1 (CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "not available", never an error here
        return False


_LAZY = {
    "default_chunk": "fused_linear",
    "fused_linear_logprob": "fused_linear",
    "CONFIGS": "ops",
    "GRPOLossFunction": "ops",
    "GRPOStats": "ops",
    "KernelConfig": "ops",
    "grpo_loss": "ops",
    "logprob_entropy": "ops",
}


def __getattr__(name: str):
    """Import the Triton modules on first use, so ``available()`` works where Triton is missing."""
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["available", *_LAZY]
