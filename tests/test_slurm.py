"""Slurm launch: rank discovery from SLURM_* variables, and the real sbatch scripts on a real local cluster.

The end-to-end tests bring up a one-node Slurm 22.05 cluster with tools/slurm_local.sh (installing munge and
Slurm with apt-get when missing; needs root) and submit slurm/cpu_test.sbatch, which runs the production
launcher body of slurm/train.sbatch. They skip when Slurm cannot be installed (not root, no apt, no mirror);
once the cluster is up, any failure fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1mega.parallel.runtime import dist_env_from_environ

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "tools" / "slurm_local.sh"
CPU_SBATCH = ROOT / "slurm" / "cpu_test.sbatch"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


# --------------------------------------------------------------------------- dist_env_from_environ (unit)


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ without torchrun or Slurm rank variables (the nodelist lookup reads os.environ)."""
    for var in RANK_VARS + SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _no_scontrol(monkeypatch, tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_single_process_without_launcher_vars(clean_env):
    env = dist_env_from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (0, 1, 0, "127.0.0.1")
    assert 0 < env.master_port < 65536


def test_torchrun_vars_win_over_slurm(clean_env):
    env = dist_env_from_environ(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "10.0.0.7",
            "MASTER_PORT": "29555",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "gpu01",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "10.0.0.7", 29555)


def test_slurm_vars_give_rank_world_and_job_derived_port(clean_env):
    env = dist_env_from_environ(
        {
            "SLURM_PROCID": "13",
            "SLURM_NTASKS": "32",
            "SLURM_LOCALID": "5",
            "SLURM_JOB_ID": "123456",
            "MASTER_ADDR": "gpu01",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (13, 32, 5, "gpu01")
    assert env.master_port == 20000 + 123456 % 40000 == 23456


def test_master_port_same_for_all_tasks_of_a_job_and_env_override_wins(clean_env):
    base = {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "987654", "MASTER_ADDR": "n1"}
    ports = {
        dist_env_from_environ({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 8)}).master_port
        for r in range(16)
    }
    assert len(ports) == 1 and 20000 <= ports.pop() < 60000
    other = dist_env_from_environ({**base, "SLURM_PROCID": "0", "SLURM_JOB_ID": "987655"})
    assert other.master_port == 20000 + 987655 % 40000
    pinned = dist_env_from_environ({**base, "SLURM_PROCID": "0", "MASTER_PORT": "31337"})
    assert pinned.master_port == 31337


def test_master_addr_from_scontrol_show_hostnames(clean_env, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    (fake / "scontrol").chmod(0o755)
    clean_env.setenv("PATH", str(fake))
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_JOB_ID", "5")
    env = dist_env_from_environ()
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 16, "gpu07", 20005)


def test_master_addr_nodelist_fallback_without_scontrol(clean_env, tmp_path):
    _no_scontrol(clean_env, tmp_path)
    for var, nodelist in (("SLURM_JOB_NODELIST", "node7,node8"), ("SLURM_NODELIST", "node3")):
        env = dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1", var: nodelist})
        assert env.master_addr == nodelist.split(",")[0]
    assert dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).master_addr == "127.0.0.1"


def test_master_addr_compressed_nodelist_fallback_without_scontrol(clean_env, tmp_path):
    _no_scontrol(clean_env, tmp_path)
    for nodelist, first in (("gpu[07-08,11]", "gpu07"), ("gpu[3,5]", "gpu3"), ("a1,b[2-3]", "a1"), ("n[10-12]", "n10")):
        env = dist_env_from_environ(
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": nodelist}
        )
        assert env.master_addr == first


def test_sbatch_scripts_parse_and_refuse_to_run_outside_slurm():
    for script in (TRAIN_SBATCH, CPU_SBATCH, SLURM_LOCAL):
        subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        ["bash", str(TRAIN_SBATCH), "train.steps=1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "submit with sbatch" in r.stderr
    header = TRAIN_SBATCH.read_text()
    for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--exclusive", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in header
    assert "gpus" not in "".join(line for line in CPU_SBATCH.read_text().splitlines() if line.startswith("#SBATCH"))


# --------------------------------------------------------------------------- a real local Slurm cluster (e2e)


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for sbatch against the local cluster; the daemons are stopped at the end if we started them."""
    if sys.platform != "linux":
        pytest.skip("the local Slurm cluster needs Linux")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    already_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True, timeout=60).returncode == 0
    try:
        r = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=60)
        pytest.skip(f"tools/slurm_local.sh start timed out (apt mirror unreachable?): {e}")
    if r.returncode == 3:
        pytest.skip(f"local Slurm unavailable: {r.stderr.strip().splitlines()[-1]}")
    if r.returncode != 0:
        if not already_up:
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=60)
        pytest.fail(f"tools/slurm_local.sh start failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    conf = next(line.split("=", 1)[1] for line in r.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = conf
    try:
        yield env
    finally:
        if not already_up:
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=60)


def _sbatch(env, out_dir: Path, script: Path, *args: str, timeout: float = 150) -> tuple[int, str, float]:
    """sbatch --wait the script with 2 tasks; returns (exit status, job output, seconds)."""
    cmd = [
        "sbatch",
        "--parsable",
        "--wait",
        "--ntasks=2",
        "--time=10",
        "--job-name=r1mega-test",
        f"--output={out_dir}/slurm-%j.out",
        str(script),
        *args,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["scancel", "--name=r1mega-test"], env=env, timeout=30)
        logs = "\n".join(p.read_text()[-3000:] for p in out_dir.glob("slurm-*.out"))
        pytest.fail(f"sbatch --wait did not return in {timeout} s; job output:\n{logs}")
    elapsed = time.perf_counter() - t0
    job = stdout.strip().split(";")[0]
    assert job.isdigit(), f"sbatch did not submit: {stdout!r} {stderr!r}"
    log = out_dir / f"slurm-{job}.out"
    return proc.returncode, (log.read_text() if log.exists() else f"<no {log}>\n{stderr}"), elapsed


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_sbatch_failing_rank_fails_the_job_fast(slurm_env, tmp_path):
    """A rank that exits non-zero ends the whole job (srun --kill-on-bad-exit) with a non-zero status; the
    launcher passes `-m r1mega.train` plus its per-job overrides, and drops rank variables leaked by the
    submitting shell."""
    record = tmp_path / "ranks.txt"
    fake_python = _write_exe(
        tmp_path / "fake_python",
        f"""#!/bin/sh
echo "rank=$SLURM_PROCID/$SLURM_NTASKS RANK=${{RANK-unset}} MASTER_PORT=${{MASTER_PORT-unset}} \
CDMC=$CUDA_DEVICE_MAX_CONNECTIONS NVLS=$NCCL_NVLS_ENABLE args=$*" >> {record}
[ "$SLURM_PROCID" = 1 ] && exit 7
sleep 100
""",
    )
    env = {**slurm_env, "R1MEGA_PYTHON": str(fake_python), "RANK": "5", "WORLD_SIZE": "9", "MASTER_PORT": "1"}
    rc, log, elapsed = _sbatch(env, tmp_path, CPU_SBATCH, "parallel.ep=2", "train.steps=1", timeout=90)
    assert rc != 0, log
    assert elapsed < 60, f"the failed job took {elapsed:.0f} s: the healthy rank was not killed\n{log}"
    rows = sorted(record.read_text().splitlines())
    assert [r.split()[0] for r in rows] == ["rank=0/2", "rank=1/2"], rows
    for row in rows:
        assert "RANK=unset MASTER_PORT=unset CDMC=1 NVLS=0" in row, row
        assert "args=-m r1mega.train logging.out_dir=runs/r1mega-test-" in row, row
        assert row.endswith("parallel.ep=2 train.steps=1"), row
    assert "finished with exit status 0" not in log


def test_sbatch_two_rank_ep2_training(slurm_env, tmp_path):
    """The real trainer as 2 Slurm tasks = 2 ranks, expert parallel 2 (MoE all-to-all across the tasks)."""
    record = tmp_path / "ranks.txt"
    wrapper = _write_exe(
        tmp_path / "python_wrapper",
        f"""#!/bin/sh
echo "start rank=$SLURM_PROCID/$SLURM_NTASKS local=$SLURM_LOCALID omp=$OMP_NUM_THREADS" >> {record}
"{sys.executable}" "$@"
rc=$?
echo "exit rank=$SLURM_PROCID rc=$rc" >> {record}
exit $rc
""",
    )
    env = {**slurm_env, "R1MEGA_PYTHON": str(wrapper), "WANDB_MODE": "disabled"}
    if sys.prefix != sys.base_prefix:
        env["R1MEGA_VENV"] = sys.prefix
    run_dir = tmp_path / "run"
    rc, log, elapsed = _sbatch(
        env,
        tmp_path,
        CPU_SBATCH,
        "parallel.ep=2",
        "sft.steps=2",
        "train.steps=1",
        "rollout.prompts_per_step=4",
        "algo.group_size=2",
        "data.num_train=200",
        "data.num_eval=4",
        "train.eval_samples=1",
        "sft.batch_size=8",
        "sft.num_examples=64",
        "rollout.sampling.max_new_tokens=8",
        "model.num_layers=2",
        "logging.plot=false",
        "logging.progress=false",
        "train.threads=1",
        f"logging.out_dir={run_dir}",
    )
    print(f"2-rank ep=2 Slurm job: {elapsed:.1f} s")
    assert rc == 0, log
    assert "world 2 (tp 1 pp 1 ep 2)" in log, log
    assert "logging.wandb_mode=disabled" in log, log  # WANDB_MODE became the Hydra override
    assert "finished with exit status 0" in log, log
    assert sorted(record.read_text().splitlines()) == [
        "exit rank=0 rc=0",
        "exit rank=1 rc=0",
        "start rank=0/2 local=0 omp=1",
        "start rank=1/2 local=1 omp=1",
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 1], rows
    assert "reward/mean" in rows[1] and "train/loss" in rows[1]
    assert "eval/greedy_accuracy" in rows[0] and "eval/greedy_accuracy" in rows[2]


def _submit(env, out_dir: Path, *args: str) -> str:
    """sbatch without --wait; ``args`` starting with "--" are sbatch flags, the rest are the job's overrides."""
    flags, overrides = [a for a in args if a.startswith("--")], [a for a in args if not a.startswith("--")]
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--time=10", "--job-name=r1mega-test", "--open-mode=append",
           f"--output={out_dir}/slurm-%j.out", *flags, str(CPU_SBATCH), *overrides]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    job = r.stdout.strip().split(";")[0]
    assert r.returncode == 0 and job.isdigit(), f"sbatch did not submit: {r.stdout!r} {r.stderr!r}"
    return job


def _wait_for(pred, what: str, timeout: float, log: Path) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            tail = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"{what} not seen in {timeout} s; job output:\n{tail}")
        time.sleep(0.3)


def test_sbatch_forwards_usr1_to_every_task_and_requeue_restarts_the_job(slurm_env, tmp_path):
    """slurm/train.sbatch: the batch shell forwards SIGUSR1 (what --signal=B:USR1@N sends it before the time limit;
    `scancel --batch --signal=USR1` sends the same) to every task; `scontrol requeue` brings the job back under the
    same job id with SLURM_RESTART_COUNT=1 (the trainer then resumes from its checkpoint: phase B)."""
    header = TRAIN_SBATCH.read_text()
    assert "#SBATCH --requeue" in header and re.search(r"#SBATCH --signal=B:USR1@\d+", header)
    record = tmp_path / "ranks.txt"
    fake_python = _write_exe(
        tmp_path / "fake_python",
        f"""#!/bin/bash
r=${{SLURM_RESTART_COUNT:-0}}
echo "start rank=$SLURM_PROCID restart=$r" >> {record}
trap 'echo "usr1 rank=$SLURM_PROCID restart=$r" >> {record}; exit 0' USR1
trap 'echo "term rank=$SLURM_PROCID restart=$r" >> {record}; exit 143' TERM
[ "$r" -gt 0 ] && {{ echo "done rank=$SLURM_PROCID restart=$r" >> {record}; exit 0; }}
for i in $(seq 900); do sleep 0.1; done
""",
    )
    env = {**slurm_env, "R1MEGA_PYTHON": str(fake_python)}

    def lines(word: str) -> list[str]:
        return sorted(x for x in (record.read_text().splitlines() if record.exists() else []) if x.startswith(word))

    job = _submit(env, tmp_path, "train.steps=1")
    log = tmp_path / f"slurm-{job}.out"
    _wait_for(lambda: len(lines("start")) == 2, "both tasks started", 90, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
    _wait_for(lambda: "finished with exit status" in (log.read_text() if log.exists() else ""), "job end", 60, log)
    assert lines("usr1") == ["usr1 rank=0 restart=0", "usr1 rank=1 restart=0"], record.read_text()
    text = log.read_text()
    assert "batch shell got SIGUSR1; forwarding it to the tasks" in text and "finished with exit status 0" in text

    record.unlink()
    job = _submit(env, tmp_path, "train.steps=1")
    log = tmp_path / f"slurm-{job}.out"
    _wait_for(lambda: len(lines("start")) == 2, "both tasks started", 90, log)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)

    # Slurm holds a requeued job back ~2 minutes (BeginTime, set once the job is pending again); make it eligible
    def pending_on_begin_time() -> bool:
        show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
        return "JobState=PENDING" in show.stdout and "Reason=BeginTime" in show.stdout

    _wait_for(pending_on_begin_time, "the requeued job pending", 60, log)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True, timeout=30)
    _wait_for(lambda: len(lines("done")) == 2, "the requeued job", 90, log)
    assert lines("term") == ["term rank=0 restart=0", "term rank=1 restart=0"]
    assert lines("start") == [f"start rank={r} restart={n}" for r in (0, 1) for n in (0, 1)]
    assert lines("done") == ["done rank=0 restart=1", "done rank=1 restart=1"]
    text = log.read_text()
    assert f"job {job} on 1 node(s)" in text and "restart 1;" in text and f"runs/r1mega-test-{job}" in text


def test_requeue_mid_run_checkpoints_resumes_and_logs_every_step_once(slurm_env, tmp_path):
    """Issue 14's acceptance on the real local Slurm: `sbatch --requeue --signal=B:USR1@20` of a short 2-rank run,
    `scontrol requeue` mid-run. The tasks get SIGTERM (KillWait before SIGKILL), finish the step and checkpoint; the
    job comes back under the same id, resumes from `latest`, and metrics.jsonl holds steps 0..N once, one run id,
    one wandb run."""
    env = {**slurm_env, "R1MEGA_PYTHON": sys.executable, "WANDB_MODE": "offline", "COLUMNS": "400"}
    if sys.prefix != sys.base_prefix:
        env["R1MEGA_VENV"] = sys.prefix
    out, steps = tmp_path / "run", 5
    job = _submit(
        env, tmp_path, "--requeue", "--signal=B:USR1@20",
        "sft.steps=0", f"train.steps={steps}", "rollout.prompts_per_step=2", "algo.group_size=2", "data.num_eval=2",
        "train.eval_samples=1", "model.num_layers=1", "train.threads=1", "rollout.sampling.max_new_tokens=4",
        "logging.plot=false", "logging.progress=false", f"logging.out_dir={out}",
    )  # fmt: skip
    log = tmp_path / f"slurm-{job}.out"
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731

    def train_steps() -> list[int]:
        path = out / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r["step"] for r in rows if "reward/mean" in r]

    _wait_for(lambda: len(train_steps()) >= 1, "the first RL step", 150, log)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)
    _wait_for(lambda: "SIGTERM received" in text(), "the checkpoint on SIGTERM", 60, log)
    done = len(train_steps())
    assert done < steps, "the requeue came after the run had finished"
    ckpt = out / "checkpoints" / f"step_{done - 1:06d}"
    assert f"stopping after {done} steps: SIGTERM received; checkpoint {ckpt}" in " ".join(text().split()), text()

    def pending_on_begin_time() -> bool:
        show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
        return "JobState=PENDING" in show.stdout and "Reason=BeginTime" in show.stdout

    _wait_for(lambda: pending_on_begin_time() or "restart 1;" in text(), "the requeued job pending", 60, log)
    if "restart 1;" not in text():
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True, timeout=30)
    _wait_for(lambda: text().count("finished with exit status") == 2, "the requeued job's end", 240, log)
    final = " ".join(text().split())
    assert "restart 1;" in final and f"resumed from {ckpt} at step {done}" in final, final[-3000:]
    assert f"job {job} finished with exit status 0" in final, final[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert train_steps() == list(range(1, steps + 1)), rows  # each step exactly once
    assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [0, steps]
    run_ids = {r["run_id"] for r in rows}
    assert len(run_ids) == 1 and {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")} == run_ids
