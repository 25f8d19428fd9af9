"""The stages of tools/bench_e2e_trl.py's GPU job (issue 12): each stage's command, one process per stage with its
wall time and GPU memory peak, what comes back from the device, and a preflight that composes every r1mega stage's
config before the first one starts (a bad override fails in a second on the CPU side, not after minutes of GPU)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).with_name("bench_e2e_trl.py")  # the trl stage's child process runs it with --trl-child
PRESET = ["+preset=smollm2_gsm8k"]
# the Hydra config each r1mega entry point composes (its @hydra.main config_name)
ENTRY_CONFIGS = {"r1mega.train": "config", "r1mega.eval.cli": "eval", "r1mega.model.hf_io": "config"}


def compose(overrides: list[str], config_name: str = "config"):
    """The typed r1mega Config of ``+preset=smollm2_gsm8k`` + overrides, composed by Hydra as an entry point composes
    it (``config_name``: ``config`` for r1mega-train, ``eval`` for r1mega-eval)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from r1mega.config import config_from_hydra, register_configs
    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return config_from_hydra(hydra_compose(config_name, overrides=PRESET + overrides))


class GpuMemory:
    """Peak GPU memory in use (nvidia-smi, every 0.5 s) while a stage runs: the same meter for both sides (SGLang
    reserves rollout.mem_fraction of the GPU up front; that is counted, as it is memory the job holds)."""

    def __init__(self) -> None:
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            q = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            try:
                out = subprocess.run(q, capture_output=True, text=True).stdout.split()
            except FileNotFoundError:  # no GPU driver here (the CPU test): nothing to measure
                return
            if out:
                self.peak_mib = max(self.peak_mib, max(int(x) for x in out))

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(name: str, cmd: list[str], out: Path, timeout: int) -> dict[str, Any]:
    """One stage in its own process, its log in ``out/<name>.log``; the wall time and the GPU memory peak."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with GpuMemory() as mem, open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
    info = {"wall_s": time.perf_counter() - t0, "peak_gpu_mib": mem.peak_mib, "rc": proc.returncode}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {info}", flush=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed (rc {proc.returncode}); see {out / f'{name}.log'}")
    return info


START_S = 150  # a training stage's time outside its RL loop: imports, model build, SGLang start, evals, export
CHECKPOINTS = ("cold", "r1mega_final", "trl_final", "r1mega_fp8_final")  # what the eval stages evaluate
# decode CUDA graphs: a short list instead of SGLang's 36 sizes up to 256 (68 up to 1024), each captured at every
# engine start; a batch between two sizes is padded to the next (for a 135M model a decode step costs about the same)
TRAIN_GRAPHS = "rollout.cuda_graph_bs=[1,2,4,8,16,24,32,48,64,96,128,160,192,224,256]"
EVAL_GRAPHS = "rollout.cuda_graph_bs=[1,2,4,8,16,32,64,128,256,384,512,640,768,896,1024]"


def eval_cmd(out: Path, extra: list[str], checkpoints: list[str]) -> list[str]:
    """One r1mega-eval process for ``checkpoints`` (eval.models: one model build and one SGLang start for all):
    greedy, then k=8 samples, each; results in ``out/eval_<ck>/eval[_greedy].json``."""
    models = ",".join(f"eval_{ck}:{out / ck}" for ck in checkpoints)
    return [sys.executable, "-m", "r1mega.eval.cli", *PRESET, f"model.hf_path={out / checkpoints[0]}",
            f"eval.models=[{models}]", "sft.steps=0",
            "eval.sets=[gsm8k]", "eval.also_greedy=true", "eval.k=8", "eval.pass_at=[1,8]", "eval.chunk_problems=660",
            "rollout=sglang", "rollout.max_batch_size=1024", EVAL_GRAPHS, f"eval.output={out / 'eval.json'}",
            f"logging.out_dir={out / 'eval'}", *extra]  # fmt: skip


def r1mega_cmds(
    out: Path,
    extra: list[str],
    rl_minutes: float | None = None,
    fp8: str = "blockwise",
    fp8_minutes: float | None = None,
) -> dict[str, list[str]]:
    """Every stage's command. ``rl_minutes``: ``train.max_minutes`` of the r1mega and TRL runs (both stop
    gracefully and export at it: a stage killed by its timeout would leave no checkpoint to evaluate); ``fp8_minutes``
    the FP8 run's (default the same). ``eval`` evaluates every checkpoint made and not yet evaluated when it starts
    (so a job can list it after each run); ``eval_<ck>`` that one alone."""
    train = [sys.executable, "-m", "r1mega.train", *PRESET]
    cap = [] if rl_minutes is None else [f"train.max_minutes={rl_minutes:.2f}"]
    fp8_minutes = rl_minutes if fp8_minutes is None else fp8_minutes
    fp8_cap = [] if fp8_minutes is None else [f"train.max_minutes={fp8_minutes:.2f}"]
    made = [ck for ck in CHECKPOINTS if (out / ck / "config.json").is_file()]
    new = [ck for ck in made if not (out / f"eval_{ck}" / "eval.json").is_file()] if made else ["cold"]
    evals = {f"eval_{ck}": eval_cmd(out, extra, [ck]) for ck in CHECKPOINTS}
    if new:  # nothing new (the run before it failed): no `eval` stage
        evals["eval"] = eval_cmd(out, extra, new)
    return {
        "cold": [
            *train,
            "train.steps=0",
            "rollout=megatron",  # no SGLang start-up for an SFT-only stage
            # the cold start's accuracy comes from r1mega-eval on the full test set: the run's own held-out check
            # stays minimal (on the H200 the megatron engine took 52 + 39 s for 8 problems x 256 tokens)
            "data.num_eval=1",
            "rollout.sampling.max_new_tokens=16",
            f"train.export_hf_dir={out / 'cold'}",
            f"logging.out_dir={out / 'r1_cold'}",
            *extra,
        ],  # fmt: skip
        "r1mega": [
            *train,
            f"model.hf_path={out / 'cold'}",
            "sft.steps=0",
            TRAIN_GRAPHS,
            f"train.export_hf_dir={out / 'r1mega_final'}",
            f"logging.out_dir={out / 'r1mega'}",
            *extra,
            *cap,
        ],  # fmt: skip
        "trl": [sys.executable, str(BENCH), "--trl-child", "--out", str(out), "--", *extra, *cap],
        "r1mega_fp8": [
            *train,
            f"model.hf_path={out / 'cold'}",
            "sft.steps=0",
            f"train.fp8={fp8}",
            TRAIN_GRAPHS,
            f"train.export_hf_dir={out / 'r1mega_fp8_final'}",
            f"logging.out_dir={out / 'r1mega_fp8'}",
            *extra,
            *fp8_cap,
        ],  # the FP8 run: its step time, and its checkpoint for the eval stage
        **evals,
    }


RUNS = {"r1mega": "r1mega_final", "r1mega_fp8": "r1mega_fp8_final"}  # an RL stage -> the HF folder it exports


def salvage_cmd(out: Path, stage: str, cmds: dict[str, list[str]]) -> list[str] | None:
    """An RL stage that ended without its export (a crash, a stop) but left a checkpoint: ``r1mega-export`` of its
    latest one into the folder the stage would have written, with the stage's own overrides (the same model), so the
    next ``eval`` stage still measures what was trained. None when there is nothing to salvage."""
    import re

    if stage not in RUNS or (out / RUNS[stage] / "config.json").is_file():
        return None
    cmd = cmds[stage]
    run_dir = next((a.split("=", 1)[1] for a in cmd if a.startswith("logging.out_dir=")), None)
    latest = Path(run_dir or "", "checkpoints", "latest")
    if run_dir is None or not latest.is_file() or not re.fullmatch(r"step_\d{6,}", latest.read_text().strip()):
        return None
    ckpt = latest.parent / latest.read_text().strip()
    return [sys.executable, "-m", "r1mega.model.hf_io", str(out / RUNS[stage]), *cmd[3:], f"model.checkpoint={ckpt}"]


def rl_minutes(max_minutes: float, timeout_s: int) -> float:
    """The RL wall-time limit of a training stage: the config's ``train.max_minutes`` (0: none), capped so that the
    run stops by itself inside the stage's ``--timeout``."""
    cap = max(1.0, (timeout_s - START_S) / 60)
    return min(max_minutes, cap) if max_minutes else cap


def copy_results(out: Path, dest: Path) -> Path:
    """What comes back from the device (the HF folders stay behind): metrics, eval results, logs and wandb runs, in
    one archive ``dest/e2e_results.tgz`` (a device command returns at most 8 files, 2 folders down). Each command's
    archive holds everything under ``out`` so far, so the last one is the whole run: unpack it, ``--stage report``."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "e2e_results.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for pattern in ("stages.json", "*.log", "*/metrics.jsonl", "eval_*/eval*.json", "*/wandb/offline-run-*"):
            for src in sorted(out.glob(pattern)):
                tar.add(src, arcname=str(src.relative_to(out)))
    return path


def preflight(cmds: dict[str, list[str]], stages: list[str]) -> None:
    """Compose the config of every r1mega stage in ``stages`` as its process will (the same overrides, the same
    entry point) and refuse the job, naming the stage and the override, if any of them would not start: an
    override meant for one stage can break another (``rollout.mem_fraction`` is SGLang's, and the ``cold`` stage runs
    ``rollout=megatron``). The trl stage composes the training config, which the job composes itself."""
    errors = []
    for name in dict.fromkeys(stages):
        cmd = cmds.get(name, [])
        entry = cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else None
        if entry not in ENTRY_CONFIGS:
            continue
        overrides = [a for a in cmd[3:] if a not in PRESET and "=" in a]  # (r1mega-export's OUT_DIR comes first)
        try:
            compose(overrides, ENTRY_CONFIGS[entry])
        except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors alike: report them all at once
            msg = " ".join(str(e).split())[:400]
            errors.append(f"stage {name} ({entry}): {type(e).__name__}: {msg}")
    if errors:
        raise SystemExit("refusing the job before its first stage; drop or fix the override:\n  " + "\n  ".join(errors))
