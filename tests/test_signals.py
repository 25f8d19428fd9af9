"""r1mega.signals.StopSignals: real signals sent to this process set should_stop and name the signal; the previous
handlers come back afterwards; a second Ctrl-C interrupts at once; outside the main thread nothing is installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r1mega.signals import STOP_SIGNALS, StopSignals


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_is_recorded_and_previous_handlers_restored(sig):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopSignals() as stop:
        assert stop.installed and not stop.should_stop and stop.signal_name is None
        os.kill(os.getpid(), sig)  # the handler runs before kill() returns to Python code
        assert stop.should_stop and stop.signal_name == signal.Signals(sig).name
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first one's name
        assert stop.signal_name == signal.Signals(sig).name
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body() -> None:
        with StopSignals() as stop:
            seen["installed"] = stop.installed
            seen["handler"] = signal.getsignal(signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "handler": before}


# --------------------------------------------------------------------------- the CLI (issue 14, fault 2)

ROOT = Path(__file__).resolve().parents[1]


def _args(out: Path, steps: int) -> list[str]:
    """A tiny run without train.save_dir: checkpoints go to <out_dir>/checkpoints."""
    return [
        "sft.steps=0", f"train.steps={steps}", "rollout.prompts_per_step=2", "algo.group_size=2", "data.num_eval=2",
        "train.eval_samples=1", "model.num_layers=1", "train.threads=1", "logging.plot=false", "logging.progress=false",
        "rollout.sampling.max_new_tokens=4", f"logging.out_dir={out}", "logging.wandb_mode=disabled",
    ]  # fmt: skip


def _train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "reward/mean" in r]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "COLUMNS": "400"}  # rich: no wrapping
    cmd = [sys.executable, "-m", "r1mega.train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_mid_run(proc: subprocess.Popen, out: Path, sig: int) -> tuple[int, str]:
    """Send ``sig`` once the first RL step is logged; the run's exit status and stderr (one line)."""
    deadline = time.monotonic() + 300
    while not _train_rows(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, " ".join(err.split())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=lambda s: signal.Signals(s).name)
def test_cli_stop_signal_finishes_the_step_saves_and_exits_128_plus_signum(sig, tmp_path):
    out = tmp_path / "run"
    rc, err = _signal_mid_run(_start(_args(out, 50), tmp_path), out, sig)
    name = signal.Signals(sig).name
    assert rc == 128 + sig, err[-3000:]  # SIGINT 130 (was a ~200-line traceback and rc -2), SIGUSR1 138
    assert "Traceback" not in err and "held-out after RL" not in err
    done = len(_train_rows(out))
    latest = out / "checkpoints" / f"step_{done - 1:06d}"  # the default save_dir, at the step that finished
    assert f"stopping after {done} steps: {name} received; checkpoint {latest}; run the same command to resume" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == latest.name and latest.is_dir()


def test_cli_sigterm_saves_and_the_rerun_resumes_with_every_step_once(tmp_path):
    out, steps = tmp_path / "run", 40  # ~60 ms a step: 5 could all end before the signal landed (CI, 2026-12-02)
    rc, err = _signal_mid_run(_start(_args(out, steps), tmp_path), out, signal.SIGTERM)
    assert rc == 143 and "SIGTERM received" in err, err[-3000:]
    done = len(_train_rows(out))
    assert 1 <= done < steps, "the signal came mid-run"
    second = _start(_args(out, steps), tmp_path)  # the same command: the requeued / restarted job
    _, err2 = second.communicate(timeout=600)
    err2 = " ".join(err2.split())
    assert second.returncode == 0, err2[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{done - 1:06d}'} at step {done}" in err2
    assert "held-out before RL" not in err2  # train.eval_before_on_resume=false: done by the first attempt
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == list(range(1, steps + 1))  # each step exactly once
    assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [0, steps]
    assert len({r["run_id"] for r in rows}) == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps - 1:06d}"
