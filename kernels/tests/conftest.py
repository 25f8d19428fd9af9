"""Kernel tests run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (it is read at decoration time), so it is
set here, at conftest import; if another test package imported r1mega_kernels earlier, its modules are reloaded.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
_KERNELS_DIR = Path(__file__).resolve().parents[1]
for p in (str(_KERNELS_DIR), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

for _name in ("r1mega_kernels._kernels", "r1mega_kernels._dist", "r1mega_kernels.ops", "r1mega_kernels.fused_linear"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Fresh random inputs every run; the seed is printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor made by torch.empty / empty_like during the test starts as NaN (floats) or 77 (integers), so an
    output element the kernels forget to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool:
            return t
        t.fill_(math.nan if (t.is_floating_point() or t.is_complex()) else 77)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
