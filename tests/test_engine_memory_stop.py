"""A run whose colocated engine cannot take its GPU memory back (r1mega/memory.py: EngineMemoryError) stops like any
stop: the checkpoint of the last step, exit status 1, the message naming the settings; the same command resumes
exactly. Its own module: the in-process run needs a runtime of its own (test_gpu_handover's engine tests hold one)."""

from __future__ import annotations

import pytest

from r1mega.memory import GpuHandover

GiB = 1 << 30


class StarvedEngine:
    """The real CPU engine, except that its resume at the start of trainer step ``fail_at`` finds the GPU too full
    (what GpuHandover raises on a GPU): scaffolding around the engine, not a mock of the loop under test."""

    def __init__(self, inner, fail_at: int, current: dict) -> None:
        self.inner, self.fail_at, self.current = inner, fail_at, current

    def resume_memory(self) -> None:
        if self.current.get("step") == self.fail_at:
            h = GpuHandover("rollout=sglang", "Lower rollout.mem_fraction.", free_bytes=lambda: 1 * GiB)
            h.owed = 40 * GiB
            h.resume(self.inner.resume_memory)  # raises EngineMemoryError
        self.inner.resume_memory()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run_cfg(tmp_path, name: str):
    from tests.test_trainer import small_config

    cfg = small_config()
    cfg.model.num_layers, cfg.data.num_eval, cfg.rollout.sampling.max_new_tokens = 1, 2, 8
    cfg.train.steps, cfg.train.save_dir = 3, str(tmp_path / name / "ckpt")
    cfg.train.offload_optimizer_during_rollout = True  # the stop must onload what the step offloaded
    cfg.logging.out_dir, cfg.logging.wandb_mode, cfg.logging.plot = str(tmp_path / name / "run"), "disabled", False
    cfg.logging.progress = False
    return cfg


def _rows(cfg) -> dict[int, dict]:
    import json
    from pathlib import Path

    lines = (Path(cfg.logging.out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


def test_an_engine_that_cannot_resume_stops_the_run_with_its_checkpoint(tmp_path, monkeypatch):
    """A real r1mega.train.run on CPU whose engine cannot take its memory back at step 3: the run stops with status 1
    and the message, the checkpoint after 2 steps is written (save_every would not have), and the same command resumes
    to a third step equal to an unbroken run's."""
    import r1mega.rollout as rollout_pkg
    from r1mega.checkpoint import latest_checkpoint
    from r1mega.train import RunStopped, run
    from r1mega.trainer import GRPOTrainer

    current: dict = {}
    real_step = GRPOTrainer.step

    def step(self, i):
        current["step"] = i
        return real_step(self, i)

    monkeypatch.setattr(GRPOTrainer, "step", step)
    real_build = rollout_pkg.build_rollout_engine
    printed: list[str] = []
    monkeypatch.setattr("rich.console.Console.print", lambda self, *a, **k: printed.append(" ".join(map(str, a))))

    unbroken = _run_cfg(tmp_path, "unbroken")
    run(unbroken)
    cfg = _run_cfg(tmp_path, "stopped")
    current.clear()
    monkeypatch.setattr(rollout_pkg, "build_rollout_engine", lambda *a: StarvedEngine(real_build(*a), 2, current))
    with pytest.raises(RunStopped) as stopped:
        run(cfg)
    assert stopped.value.status == 1
    assert latest_checkpoint(cfg.train.save_dir).name == "step_000001"  # after 2 steps; train.save_every is 0
    said = [p for p in printed if p.startswith("stopping: step 3 (after 2 steps): rollout=sglang: cannot take")]
    assert said and "needs 42.95 GB" in said[0] and "rollout.mem_fraction" in said[0] and "step_000001" in said[0]
    assert sorted(_rows(cfg)) == [1, 2]

    monkeypatch.setattr(rollout_pkg, "build_rollout_engine", real_build)
    current.clear()
    run(cfg)  # the same command: resumes from step_000001
    rows, want = _rows(cfg), _rows(unbroken)
    assert sorted(rows) == [1, 2, 3]
    for k in ("reward/mean", "train/loss", "train/kl", "train/grad_norm", "train/entropy"):
        assert rows[3][k] == want[3][k], k
