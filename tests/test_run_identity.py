"""Run identity (issue 14, fault 6): one job per out_dir (a lock naming the holder; a dead holder's lock is taken
over), one run id across attempts (metrics rows and the wandb run), a resumed run continues metrics.jsonl with
every step once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.config import ConfigError
from r1mega.run_identity import RunIdentity, RunLock, RunLockError, resolve_run_id
from r1mega.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
HOLDER = "import sys, time; from r1mega.run_identity import RunIdentity; RunIdentity(sys.argv[1]); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _holder(out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_second_job_in_the_same_out_dir_stops_and_a_dead_jobs_lock_is_taken_over(tmp_path, caplog):
    first = _holder(tmp_path)
    try:
        with pytest.raises(RunLockError) as e:
            RunIdentity(str(tmp_path))
        assert f"pid {first.pid} on host {socket.gethostname()}" in str(e.value) and "logging.out_dir" in str(e.value)
        assert isinstance(e.value, ConfigError)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with caplog.at_level(logging.WARNING, logger="r1mega.run_identity"):
        with RunIdentity(str(tmp_path)) as ident:  # the killed job's lock file is still there, but not held
            assert f"left by pid {first.pid}" in caplog.text
            assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
            assert ident.run_id == (tmp_path / "run_id").read_text().strip()
    # a lock file naming a pid that does not exist (e.g. copied from another machine) does not block either
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere"}))
    RunLock(tmp_path).release()


def test_run_id_is_kept_across_attempts(tmp_path):
    out, save = tmp_path / "out", tmp_path / "ckpt"
    rid = resolve_run_id(out, save)
    assert len(rid) == 8 and (out / "run_id").read_text().strip() == rid == (save / "run_id").read_text().strip()
    assert resolve_run_id(out, save) == rid  # the same job, requeued
    assert resolve_run_id(tmp_path / "new_out", save) == rid  # a resume from the same save_dir, another out_dir
    assert resolve_run_id(tmp_path / "other") != rid


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_tracker_rows_carry_the_run_id_and_a_resume_logs_every_step_once(tmp_path):
    def tracker() -> Tracker:
        return Tracker(str(tmp_path), "disabled", "p", None, {}, run_id="abc12345")

    t = tracker()
    t.resume_from(0)
    t.log({"eval/greedy_accuracy": 0.1}, step=0)
    for step in (1, 2, 3):  # the attempt saved a checkpoint after step 2, logged step 3, then died
        t.log({"reward/mean": float(step)}, step=step)
    t.finish()
    t = tracker()
    t.resume_from(2)  # resumed from the checkpoint holding 2 steps
    t.log({"eval/greedy_accuracy": 0.5}, step=0)  # the "before" eval again: already in the file
    t.log({"reward/mean": 30.0}, step=3)
    t.log({"eval/greedy_accuracy": 0.9}, step=3)
    t.finish()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("reward/mean", r.get("eval/greedy_accuracy"))) for r in rows] == [
        (0, 0.1), (1, 1.0), (2, 2.0), (3, 30.0), (3, 0.9)
    ]  # fmt: skip
    assert {r["run_id"] for r in rows} == {"abc12345"}
    t = tracker()
    t.resume_from(0)  # a fresh start in a used out_dir: the old file is kept aside, not mixed in
    t.log({"reward/mean": 7.0}, step=1)
    t.finish()
    assert [r["reward/mean"] for r in _rows(tmp_path / "metrics.jsonl")] == [7.0]
    assert len(_rows(next(tmp_path.glob("metrics.2*.jsonl")))) == 5


def test_wandb_run_id_is_reused_with_resume_allow(tmp_path):
    pytest.importorskip("wandb")
    ids = []
    for _ in range(2):
        t = Tracker(str(tmp_path), "offline", "r1mega-test", "x", {"a": 1}, run_id="runid123")
        ids.append(t.run.id)
        t.log({"reward/mean": 1.0}, step=len(ids))
        t.finish()
    assert ids == ["runid123", "runid123"]
    assert all(p.name.endswith("-runid123") for p in (tmp_path / "wandb").glob("offline-run-*"))


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "r1mega.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_second_job_stops_and_resumed_run_continues_metrics(tmp_path):
    out, save = tmp_path / "run", tmp_path / "ckpt"
    holder = _holder(out)
    try:
        proc = _cli([f"logging.out_dir={out}", "train.steps=1"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and f"in use by another job (pid {holder.pid}" in proc.stderr, proc.stderr[-2000:]
    assert "params on this rank" not in proc.stderr
    common = [
        "sft.steps=0", "train.steps=3", "rollout.prompts_per_step=2", "algo.group_size=2", "data.num_eval=2",
        "train.eval_samples=1", "model.num_layers=1", "train.threads=1", "logging.plot=false", "logging.progress=false",
        "rollout.sampling.max_new_tokens=4", f"logging.out_dir={out}", f"train.save_dir={save}", "train.save_every=2",
    ]  # fmt: skip
    first = _cli(common, tmp_path)  # checkpoints after 2 steps, logs step 3, checkpoints at the end
    assert first.returncode == 0, first.stderr[-3000:]
    # as if it died after logging step 3, before its final checkpoint: latest goes back to step_000001
    shutil.rmtree(save / "step_000002")
    (save / "latest").write_text("step_000001")
    second = _cli(common, tmp_path)  # the requeued job: resumes from step_000001 (2 steps done)
    assert second.returncode == 0 and "at step 2" in second.stderr, second.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    train = [r["step"] for r in rows if "reward/mean" in r]
    evals = [r["step"] for r in rows if "eval/greedy_accuracy" in r]
    assert train == [1, 2, 3] and evals == [0, 3], rows  # was [1, 2, 3, 3] and [0, 3, 0, 3]
    rid = (out / "run_id").read_text().strip()
    assert {r["run_id"] for r in rows} == {rid} and (save / "run_id").read_text().strip() == rid
    assert {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")} == {rid}


def test_a_killed_wandb_service_does_not_stop_the_run(tmp_path, caplog):
    """Slurm signals every process of a job on requeue / scancel, wandb's service included: the trainer must still
    log, save and exit cleanly (this crashed the checkpoint-on-requeue of tests/test_slurm.py)."""
    pytest.importorskip("wandb")
    t = Tracker(str(tmp_path), "offline", "r1mega-test", "x", {}, run_id="gone1234")
    t.log({"reward/mean": 1.0}, step=1)
    kids = subprocess.run(["pgrep", "-P", str(os.getpid()), "wandb-core"], capture_output=True, text=True).stdout
    assert kids.split(), "no wandb-core service process"
    for pid in kids.split():
        os.kill(int(pid), signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(pid), 0)
    with caplog.at_level(logging.WARNING, logger="r1mega.tracking"):
        t.log({"reward/mean": 2.0}, step=2)
        t.summary({"x": 1.0})
        t.finish()
    assert "wandb stopped" in caplog.text and t.run is None
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]
