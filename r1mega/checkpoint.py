"""Checkpoints: megatron dist_checkpointing (any parallel layout can load any other), written atomically.

A checkpoint is ``<dir>/step_000123/`` holding the sharded model (+ optimizer) and ``trainer.pt`` (step,
RNG states). It is written to ``step_000123.tmp`` and renamed only once every rank has finished; the
``latest`` file is then replaced atomically, so a crash mid-save never leaves a checkpoint that looks
complete. Loading a model-only checkpoint into another TP / PP / EP layout is how the parallel tests
give every layout the same weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(model, path: str | os.PathLike) -> None:
    """Model weights only, as a sharded checkpoint directory (collective: call on every rank)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    _barrier()


def load_model(model, path: str | os.PathLike) -> None:
    """Load weights saved by :func:`save_model` or :func:`save_checkpoint` under any parallel layout."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if (path / "model").is_dir():
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check model.checkpoint / train.save_dir")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state, strict=False)  # TE's _extra_state entries may differ across layer specs


def save_checkpoint(save_dir: str, step: int, policy) -> Path:
    """Model + optimizer + trainer state for step ``step``; returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "optim").mkdir()
    _barrier()
    model_sd = policy.model.sharded_state_dict()
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    dist_checkpointing.save(policy.optimizer.sharded_state_dict(policy.model.sharded_state_dict()), str(tmp / "optim"))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"step": step, "rng": rng}, tmp / f"trainer_rank{dist.get_rank()}.pt")
    if policy.ref_model is not None:
        dist_checkpointing.save(policy.ref_model.sharded_state_dict(), str(_mkdir0(tmp / "ref")))
    _barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    _barrier()
    return final


def _mkdir0(path: Path) -> Path:
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    return path


def latest_checkpoint(save_dir: str | None) -> Path | None:
    if not save_dir:
        return None
    marker = Path(save_dir) / "latest"
    if not marker.is_file():
        return None
    path = Path(save_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, policy) -> int:
    """Restore model, optimizer, reference and RNG from ``path``; returns the number of steps done."""
    from megatron.core import dist_checkpointing

    load_model(policy.model, path / "model")
    optim_sd = dist_checkpointing.load(
        policy.optimizer.sharded_state_dict(policy.model.sharded_state_dict(), is_loading=True), str(path / "optim")
    )
    policy.optimizer.load_state_dict(optim_sd)
    if policy.ref_model is not None and (path / "ref").is_dir():
        load_model(policy.ref_model, path / "ref")
    state = torch.load(path / f"trainer_rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["step"]) + 1
