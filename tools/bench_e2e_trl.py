"""r1mega vs TRL's GRPOTrainer, end to end on one GPU: same model, prompts, G, lengths, lr, KL, clip, steps (issue 12).

    python tools/bench_e2e_trl.py --dry-run                    # CPU: the config mapping both ways (no TRL needed)
    python tools/bench_e2e_trl.py --out /tmp/e2e               # GPU: the whole job (docs/perf/e2e.md has the carries)

One job, one process per stage (each side starts on a clean GPU, so peak memories compare):

1. ``cold``: r1mega's cold-start SFT of ``+preset=smollm2_gsm8k`` (3000 held-out GSM8K-train solutions in R1 format),
   exported as a HF folder (``train.steps=0 train.export_hf_dir``): the checkpoint both sides start from.
2. ``r1mega``: GRPO from it (``model.hf_path=<cold> sft.steps=0``; the RL prompts are the same held-out split).
3. ``trl``: TRL 1.16's ``GRPOTrainer`` from the same folder, on the same RL prompts (the same chat template: TRL
   applies it to conversational prompts), with r1mega's reward code (``RewardScorer``: the same format + accuracy
   rules, weights and timeouts). Rollouts: TRL's default ``model.generate`` (vLLM is not carried to the machine).
   Its code: tools/e2e_trl_side.py.
4. ``eval``: ``r1mega-eval`` on GSM8K test (all 1319; greedy, and pass@1 over 8 samples, in one process per
   checkpoint: ``eval.also_greedy``) of the cold-start, r1mega and TRL checkpoints: one evaluator for all three.
   ``r1mega_fp8`` (only when named in ``--stage``): the r1mega run with ``train.fp8=blockwise``, for its step time.
5. ``report``: one table (per-step time split, tokens/s, peak GPU memory, accuracy before / after) and PNG curves
   (tools/e2e_report.py).

TRL's side is set up as its docs recommend for speed (see ``trl_kwargs``): bf16 weights and autocast,
gradient checkpointing OFF (TRL's GRPOConfig turns it ON by default; a 135M model does not need it), SDPA
attention, one generation batch of P x G completions per optimizer step (no re-generation per micro-batch),
no reference model copy when beta = 0. Field names are TRL 1.16.0's (trl/trainer/grpo_config.py, cited below);
on the GPU they are checked against ``dataclasses.fields(GRPOConfig)`` before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is no package: its e2e_report beside this file
from e2e_report import report  # noqa: E402
from e2e_trl_side import run_trl  # noqa: E402

PRESET = ["+preset=smollm2_gsm8k"]

# r1mega algo.loss_agg -> TRL loss_type (grpo_config.py:801: 'grpo' = per-sequence length mean, then batch mean;
# 'dapo' = over all active tokens of the global batch; 'dr_grpo' = over a constant, max_completion_length)
LOSS_AGG = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo"}
# TRL 1.16 GRPOConfig fields used here (grpo_config.py line): learning_rate 423, disable_dropout 453, num_generations
# 480, max_completion_length 494, shuffle_dataset 507, generation_batch_size 521, temperature 532, top_p 536, top_k
# 543, use_vllm 587, beta 681, num_iterations 689, epsilon 693, epsilon_high 705, importance_sampling_level 760,
# scale_rewards 789, loss_type 801, mask_truncated_completions 836, log_completions 985; the rest are
# transformers.TrainingArguments fields.
TRL_FIELDS = frozenset(
    "learning_rate disable_dropout num_generations max_completion_length shuffle_dataset generation_batch_size "
    "temperature top_p top_k use_vllm beta num_iterations epsilon epsilon_high importance_sampling_level "
    "scale_rewards loss_type mask_truncated_completions log_completions "
    "per_device_train_batch_size gradient_accumulation_steps max_steps bf16 gradient_checkpointing lr_scheduler_type "
    "warmup_steps weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm logging_steps report_to "
    "save_strategy seed output_dir".split()
)


def compose(overrides: list[str]):
    """The typed r1mega Config of ``+preset=smollm2_gsm8k`` + overrides (Hydra, as r1mega-train composes it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from r1mega.config import config_from_hydra, register_configs
    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return config_from_hydra(hydra_compose("config", overrides=PRESET + overrides))


def trl_kwargs(cfg, output_dir: str) -> dict[str, Any]:
    """GRPOConfig keyword arguments for r1mega's ``cfg``: the same algorithm, batch and schedule."""
    a, s, o, t = cfg.algo, cfg.rollout.sampling, cfg.optim, cfg.train
    if a.num_minibatches != 1 or a.dynamic_sampling != "none" or a.ref_reset_every or a.loss_agg not in LOSS_AGG:
        raise ValueError("the TRL mapping covers one optimizer step per rollout, no dynamic sampling / ref reset")
    per_step = cfg.rollout.prompts_per_step * a.group_size  # completions per optimizer step
    micro = min(t.micro_batch_size, per_step)
    if per_step % micro:
        raise ValueError(f"train.micro_batch_size={micro} must divide prompts_per_step x group_size = {per_step}")
    return {
        "num_generations": a.group_size,
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,  # both: 0 = off
        "beta": a.beta,  # k3 KL to the reference (0 = TRL loads no reference model)
        "epsilon": a.eps_low,
        "epsilon_high": a.eps_high,
        "loss_type": LOSS_AGG[a.loss_agg],
        "scale_rewards": "group" if a.adv_std_norm else "none",
        "importance_sampling_level": a.ratio_level,
        "num_iterations": 1,  # one pass over each rollout (r1mega: num_minibatches=1)
        "mask_truncated_completions": False,  # r1mega trains on truncated responses too
        # one generation of P x G completions per optimizer step, trained in micro-batches of `micro`
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": per_step // micro,
        "generation_batch_size": per_step,
        "max_steps": t.steps,
        "learning_rate": o.lr,
        "lr_scheduler_type": "constant_with_warmup" if o.warmup_steps else "constant",  # r1mega: warmup, then flat
        "warmup_steps": o.warmup_steps,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2,  # TRL's default is 0.999; r1mega's preset 0.99
        "adam_epsilon": o.adam_eps,
        "max_grad_norm": o.clip_grad,
        "seed": t.seed,
        # speed, as TRL recommends: bf16, no gradient checkpointing (its GRPOConfig default is True), no vLLM here
        "bf16": t.precision == "bf16",
        "gradient_checkpointing": False,
        "use_vllm": False,
        "disable_dropout": True,
        "shuffle_dataset": True,
        "logging_steps": 1,
        "log_completions": False,
        "report_to": "none",
        "save_strategy": "no",
        "output_dir": output_dir,
    }


def r1mega_from_trl(kw: dict[str, Any]) -> dict[str, Any]:
    """The inverse: r1mega's dotted config fields from GRPOConfig kwargs (the dry run checks the round trip)."""
    per_step = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"]
    assert kw["generation_batch_size"] == per_step and kw["num_iterations"] == 1, "one optimizer step per rollout"
    return {
        "algo.group_size": kw["num_generations"],
        "rollout.prompts_per_step": per_step // kw["num_generations"],
        "rollout.sampling.max_new_tokens": kw["max_completion_length"],
        "rollout.sampling.temperature": kw["temperature"],
        "rollout.sampling.top_p": kw["top_p"],
        "rollout.sampling.top_k": kw["top_k"],
        "algo.beta": kw["beta"],
        "algo.eps_low": kw["epsilon"],
        "algo.eps_high": kw["epsilon_high"],
        "algo.loss_agg": {v: k for k, v in LOSS_AGG.items()}[kw["loss_type"]],
        "algo.adv_std_norm": kw["scale_rewards"] == "group",
        "algo.ratio_level": kw["importance_sampling_level"],
        "algo.num_minibatches": 1,
        "train.steps": kw["max_steps"],
        "optim.lr": kw["learning_rate"],
        "optim.warmup_steps": kw["warmup_steps"],
        "optim.weight_decay": kw["weight_decay"],
        "optim.adam_beta1": kw["adam_beta1"],
        "optim.adam_beta2": kw["adam_beta2"],
        "optim.adam_eps": kw["adam_epsilon"],
        "optim.clip_grad": kw["max_grad_norm"],
        "train.seed": kw["seed"],
        "train.precision": "bf16" if kw["bf16"] else "fp32",
    }


def check_mapping(cfg, output_dir: str = "/tmp/trl") -> dict[str, Any]:
    """Both directions: every mapped TRL name is a TRL 1.16 field, and TRL's kwargs give back r1mega's values."""
    from omegaconf import OmegaConf

    kw = trl_kwargs(cfg, output_dir)
    unknown = set(kw) - TRL_FIELDS
    assert not unknown, f"not TRL 1.16 GRPOConfig fields: {sorted(unknown)}"
    try:  # on the GPU machine, TRL itself is the reference
        import dataclasses

        from trl import GRPOConfig

        missing = set(kw) - {f.name for f in dataclasses.fields(GRPOConfig)}
        assert not missing, f"this TRL has no GRPOConfig fields {sorted(missing)}"
    except ImportError:
        pass
    conf = OmegaConf.structured(cfg)
    back = r1mega_from_trl(kw)
    wrong = {k: (v, OmegaConf.select(conf, k)) for k, v in back.items() if v != OmegaConf.select(conf, k)}
    assert not wrong, f"TRL -> r1mega differs (trl, r1mega): {wrong}"
    return kw


# ---------------------------------------------------------------------------------------------- the GPU job


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
        "trl": [sys.executable, __file__, "--trl-child", "--out", str(out), "--", *extra, *cap],
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


# ---------------------------------------------------------------------------------------------- the CLI

STAGES = ("cold", "r1mega", "trl", "eval", "report")  # the whole job; r1mega_fp8 runs when named


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: compose the preset and check the TRL mapping")
    ap.add_argument("--out", default="/tmp/e2e")
    ap.add_argument("--stage", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    ap.add_argument("--timeout", type=int, default=570, help="seconds per stage (a device command: <= 600)")
    ap.add_argument("--results", help="copy the small artefacts (metrics, eval.json, logs) here, e.g. $OUT")
    ap.add_argument("--pack", action="store_true", help="only archive what --out holds now into --results")
    ap.add_argument("--fp8", default="blockwise", help="train.fp8 of the r1mega_fp8 stage (blockwise | tensorwise)")
    ap.add_argument("--fp8-minutes", type=float, help="train.max_minutes of the r1mega_fp8 stage (default: the RL one)")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)  # the trl stage's own process
    ap.add_argument("overrides", nargs="*", help="r1mega Hydra overrides for every stage (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.dry_run:
        cfg = compose([f"model.hf_path={os.environ.get('SMOLLM2_HF', out / 'cold')}", *args.overrides])
        kw = check_mapping(cfg, str(out / "trl"))
        print(json.dumps({"trl_grpo_config": kw, "r1mega": r1mega_from_trl(kw)}, indent=1, default=str))
        for name, cmd in r1mega_cmds(out, args.overrides, rl_minutes(cfg.train.max_minutes, args.timeout)).items():
            print(f"{name}: {' '.join(cmd)}")
        return
    if args.pack:  # a waiting device command brings back a running job's files so far
        print(copy_results(out, Path(args.results or out)))
        return
    if args.trl_child:
        cfg = compose([f"model.hf_path={out / 'cold'}", "sft.steps=0", *args.overrides])
        run_trl(out, cfg, check_mapping(cfg, str(out / "trl")))
        return
    wanted = args.stage.split(",")  # stage groups (STAGES) or single stage names (eval_cold, ...)
    out.mkdir(parents=True, exist_ok=True)
    if wanted == ["report"]:  # on the CPU, from the files a device command brought back
        print(report(out, json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}))
        return
    cfg = compose([f"model.hf_path={os.environ.get('SMOLLM2_HF', '')}", *args.overrides])
    check_mapping(cfg)  # before the GPU
    info_path = out / "stages.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    minutes = rl_minutes(cfg.train.max_minutes, args.timeout)
    fp8_minutes = None if args.fp8_minutes is None else rl_minutes(args.fp8_minutes, args.timeout)
    failed = []
    for i, name in enumerate(wanted):  # in the order given; `eval` may come after each run
        cmds = r1mega_cmds(out, args.overrides, minutes, args.fp8, fp8_minutes)  # now: the folders made so far
        if name not in cmds:
            if name == "eval":
                print(f"[{time.strftime('%H:%M:%S')}] eval: no checkpoint left to evaluate, skipped", flush=True)
            continue
        key = name if name not in wanted[:i] else f"{name}_{wanted[:i].count(name) + 1}"
        try:
            info[key] = run_stage(key, cmds[name], out, args.timeout)  # its log: out/<key>.log
        except (SystemExit, subprocess.TimeoutExpired) as e:  # the later stages that do not need it still run
            print(f"[{time.strftime('%H:%M:%S')}] {name}: FAILED: {e}", flush=True)
            info[key], failed = {"failed": str(e)[:300]}, [*failed, name]
            if name == "cold":
                break  # every later stage starts from its folder
        finally:
            info_path.write_text(json.dumps(info, indent=1))
            if args.results:
                copy_results(out, Path(args.results))
    if "report" in wanted:
        print(report(out, info))
        print(f"curves: {out / 'e2e_curves.png'}; table: {out / 'e2e_table.md'}")
    if failed:
        raise SystemExit(f"failed stages: {', '.join(failed)} (their logs: {out}/<stage>.log)")


if __name__ == "__main__":
    main()
