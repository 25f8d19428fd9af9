"""Checkpoints: megatron dist_checkpointing (any parallel layout can load any other), written atomically.

A checkpoint is ``<dir>/step_000123/`` holding the sharded model (+ optimizer) and ``trainer.pt`` (step,
RNG states). It is written to ``step_000123.tmp`` and renamed only once every rank has finished; the
``latest`` file is then replaced atomically, so a crash mid-save never leaves a checkpoint that looks
complete. Loading a model-only checkpoint into another TP / PP / EP layout is how the parallel tests
give every layout the same weights.

A model with a non-finite weight is never saved (``latest`` keeps pointing at the last finite checkpoint);
``train.keep_last`` keeps only the newest checkpoints; a checkpoint of another model shape is refused with the
tensor, both shapes and the fix instead of megatron's raw shape-mismatch error.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.procs import children_die_with_parent, die_with_parent

logger = logging.getLogger(__name__)

# The optimizer state is saved in megatron's canonical per-parameter form, so a run can resume under
# another parallel layout (the default "fully_sharded_model_space" format cannot be saved in 0.16.1).
_OPTIM_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_state(policy, is_loading: bool):
    model_sd = policy.model.sharded_state_dict()
    if policy.cfg.parallel.distributed_optimizer:
        return policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_FORMAT)
    return policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def _inner_optimizers(policy) -> list:
    return [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]


def _adam_steps(policy) -> list[float | None]:
    """torch Adam's per-parameter step counts (bias correction): megatron's optimizer checkpoint
    formats carry exp_avg / exp_avg_sq but not torch's ``step`` (TE/apex FusedAdam keep it per group)."""
    out = []
    for opt in _inner_optimizers(policy):
        steps = {float(st["step"]) for st in opt.state.values() if "step" in st}
        out.append(steps.pop() if len(steps) == 1 else None)
    return out


def _set_adam_steps(policy, steps: list[float | None]) -> None:
    for opt, step in zip(_inner_optimizers(policy), steps):
        if step is None:
            continue
        for st in opt.state.values():
            if "step" in st:
                st["step"] = (
                    torch.as_tensor(step, dtype=st["step"].dtype, device=st["step"].device)
                    if torch.is_tensor(st["step"])
                    else step
                )


_writer_manager = None  # the multiprocessing Manager behind megatron's checkpoint-writer result queue


def _dist_save(sharded_state_dict, path: str) -> None:
    """``dist_checkpointing.save`` whose helper processes die with the trainer.

    megatron's torch_dist writer forks one writer process per file for each save, and passes their results
    through a ``multiprocessing.Manager().Queue()`` that it starts lazily: a spawned server process (~300 MB)
    that nothing stops when the trainer is killed. megatron offers no hook for either, so the Manager is started
    here (its server armed with a parent-death signal) and stored where megatron looks for it, and the writers
    are forked under :func:`r1mega.procs.children_die_with_parent`. A normal exit shuts the Manager down
    (multiprocessing's exit handler).
    """
    global _writer_manager
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:  # megatron-core 0.16's lazy global
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        _writer_manager = SyncManager(ctx=mp.get_context("spawn"))
        _writer_manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _writer_manager.Queue()
    with children_die_with_parent():
        dist_checkpointing.save(sharded_state_dict, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(model, path: str | os.PathLike) -> None:
    """Model weights only, as a sharded checkpoint directory (collective: call on every rank)."""

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    _dist_save(model.sharded_state_dict(), str(path))
    _barrier()


def load_model(model, path: str | os.PathLike) -> None:
    """Load weights saved by :func:`save_model` or :func:`save_checkpoint` under any parallel layout."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if (path / "model").is_dir():
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check model.checkpoint / train.save_dir")
    check_compatible(model, path)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state, strict=False)  # TE's _extra_state entries may differ across layer specs


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a model of another shape; the message names the tensor and the fix."""


def check_compatible(model, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint at ``path`` holds exactly this model's tensors
    with the same global shapes (collective: the tensor names are gathered over all ranks, since each pipeline /
    expert rank holds only some of them)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # e.g. SwiGLU's fc1 is saved as two tensors
    expected = {t.key: tuple(t.global_shape) for t in nested_values(sharded) if isinstance(t, ShardedTensor)}
    saved = {k: tuple(t.global_shape) for k, t in load_tensors_metadata(str(path)).items()}
    everywhere = set(expected)
    if dist.is_initialized() and dist.get_world_size() > 1:
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(expected))
        everywhere = {k for n in names for k in n}
    problems = [
        f"{k}: saved {saved[k]} vs this model's {shape}"
        for k, shape in expected.items()
        if k in saved and saved[k] != shape
    ]
    problems += [f"{k} (shape {shape}) is not in the checkpoint" for k, shape in expected.items() if k not in saved]
    problems += [
        f"{k} (shape {saved[k]}) is in the checkpoint but not in this model" for k in sorted(set(saved) - everywhere)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a model of another shape: " + "; ".join(problems[:3]) + more + ". "
            "Fix: run with the model.* settings of the run that wrote it (layers, hidden size, heads, experts, "
            "vocabulary / tokenizer), or start from scratch: a new train.save_dir or train.resume=false "
            "(for model.checkpoint: point it at a checkpoint of this model)"
        )


def model_is_finite(model) -> bool:
    """True when every weight on every rank is finite (collective). One device sync per rank."""
    params = [p for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    bad = (~ok).to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _non_finite_names(model, limit: int = 5) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()][:limit]


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep``, the one ``latest`` names)."""
    done = sorted(
        (p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{6,}", p.name)),
        key=lambda p: int(p.name[5:]),
    )
    for old in done[: max(0, len(done) - keep_last)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(save_dir: str, step: int, policy, keep_last: int | None = None) -> Path | None:
    """Model + optimizer + trainer state for step ``step``; returns the final directory.

    Returns None, writing nothing, when a weight is non-finite on any rank (logged with the tensor names): a
    NaN checkpoint would become ``latest`` and poison every resume. ``keep_last`` (default
    ``policy.cfg.train.keep_last``; 0 = all) bounds how many checkpoints stay in ``save_dir``.
    """
    if not model_is_finite(policy.model):
        logger.error(
            "not saving step %d to %s: the model has non-finite weights (%s); latest still points at the last "
            "finite checkpoint",
            step,
            save_dir,
            ", ".join(_non_finite_names(policy.model)) or "on another rank",
        )
        return None
    if keep_last is None:
        keep_last = int(getattr(getattr(policy.cfg, "train", None), "keep_last", 0) or 0)

    root = Path(save_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "optim").mkdir()
    _barrier()
    model_sd = policy.model.sharded_state_dict()
    _dist_save(model_sd, str(tmp / "model"))
    _dist_save(_optimizer_state(policy, is_loading=False), str(tmp / "optim"))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"step": step, "rng": rng, "adam_steps": _adam_steps(policy)}, tmp / f"trainer_rank{dist.get_rank()}.pt")
    if policy.ref_model is not None:
        _dist_save(policy.ref_model.sharded_state_dict(), str(_mkdir0(tmp / "ref")))
    _barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        if keep_last > 0:
            _prune(root, keep_last, final)
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

    check_compatible(policy.model, path / "model")  # before the optimizer, whose shapes would mismatch first
    # torch Adam creates its state lazily; megatron's loader needs it to exist (a zero-grad step,
    # megatron's own mechanism for this). Model weights are loaded after it, so it changes nothing.
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
    optim_sd = dist_checkpointing.load(_optimizer_state(policy, is_loading=True), str(path / "optim"))
    with torch.no_grad():  # megatron copies into main params that are views of leaf parameters
        policy.optimizer.load_state_dict(optim_sd)
    load_model(policy.model, path / "model")
    if policy.ref_model is not None and (path / "ref").is_dir():
        load_model(policy.ref_model, path / "ref")
    state = torch.load(path / f"trainer_rank{dist.get_rank()}.pt", weights_only=False)
    _set_adam_steps(policy, state["adam_steps"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["step"]) + 1
