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
4. ``eval``: ``r1mega-eval`` on GSM8K test (all 1319; greedy, and pass@1 over 8 samples) of the cold-start, r1mega
   and TRL checkpoints: one evaluator for all three.
5. ``report``: one table (per-step time split, tokens/s, peak GPU memory, accuracy before / after) and PNG curves.

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
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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
            out = subprocess.run(q, capture_output=True, text=True).stdout.split()
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


def r1mega_cmds(out: Path, extra: list[str]) -> dict[str, list[str]]:
    py, train = sys.executable, [sys.executable, "-m", "r1mega.train", *PRESET]
    evals = {}
    for ck in ("cold", "r1mega_final", "trl_final"):
        common = [*PRESET, f"model.hf_path={out / ck}", "sft.steps=0", "eval.sets=[gsm8k]", "rollout=sglang"]
        evals[f"eval_{ck}_greedy"] = [py, "-m", "r1mega.eval.cli", *common, "eval.greedy=true",
                                      f"logging.out_dir={out / f'eval_{ck}_greedy'}", *extra]  # fmt: skip
        evals[f"eval_{ck}_k8"] = [py, "-m", "r1mega.eval.cli", *common, "eval.k=8", "eval.pass_at=[1,8]",
                                  "eval.save_responses=false",  # 10k answers: the archive must stay < 16 MiB
                                  f"logging.out_dir={out / f'eval_{ck}_k8'}", *extra]  # fmt: skip
    return {
        "cold": [
            *train,
            "train.steps=0",
            "data.num_eval=8",  # the cold start's accuracy comes from r1mega-eval on the full test set
            f"train.export_hf_dir={out / 'cold'}",
            f"logging.out_dir={out / 'r1_cold'}",
            *extra,
        ],  # fmt: skip
        "r1mega": [
            *train,
            f"model.hf_path={out / 'cold'}",
            "sft.steps=0",
            f"train.export_hf_dir={out / 'r1mega_final'}",
            f"logging.out_dir={out / 'r1mega'}",
            *extra,
        ],  # fmt: skip
        "trl": [py, __file__, "--trl-child", "--out", str(out), "--", *extra],
        **evals,
    }


def rl_prompts(cfg) -> list[tuple[str, str]]:
    """(question, gold) of r1mega's RL prompts: GSM8K train minus the cold-start demonstrations, as r1mega-train."""
    from r1mega.data.cold_start import split_cold_start
    from r1mega.data.tasks import load_problems

    train, evals = load_problems(cfg.data)
    return [(p.question, p.answer) for p in split_cold_start(train, evals, cfg)[0]]


class StageTimes:
    """Seconds per stage since the last ``take()`` (CUDA-synchronised, so a stage owns its kernels)."""

    def __init__(self) -> None:
        self.sec: dict[str, float] = {}
        self.notes: dict[str, list[float]] = {}

    def stage(self, name: str):
        import contextlib

        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None  # CPU: the smoke test

        @contextlib.contextmanager
        def timed():
            sync()
            t0 = time.perf_counter()
            try:
                yield
            finally:
                sync()
                self.sec[name] = self.sec.get(name, 0.0) + time.perf_counter() - t0

        return timed()

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        sec, notes = self.sec, {k: statistics.fmean(v) for k, v in self.notes.items() if v}
        self.sec, self.notes = {}, {}
        return sec, notes


def run_trl(out: Path, extra: list[str]) -> None:
    """TRL's GRPOTrainer from the cold-start folder on r1mega's RL prompts; metrics.jsonl in r1mega's key names."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1mega.data.tokenizer import end_of_turn_id
    from r1mega.rewards import RewardScorer

    cold, log_dir = out / "cold", out / "trl"
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose([f"model.hf_path={cold}", "sft.steps=0", *extra])
    kw = check_mapping(cfg, str(log_dir))
    tok = AutoTokenizer.from_pretrained(cold)
    eot = end_of_turn_id(
        tok
    )  # TRL stops on tokenizer.eos_token_id + generation_config.eos_token_id: make both <|im_end|>
    tok.eos_token = tok.convert_ids_to_tokens(eot)
    dtype = torch.bfloat16 if kw["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cold, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = eot
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "gold": a} for q, a in rl_prompts(cfg)])
    times = StageTimes()
    scorer = RewardScorer(cfg.reward)

    def r1_rules(prompts, completions, gold, **_) -> list[float]:  # r1mega's reward code: format + accuracy
        with times.stage("reward"):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            r = scorer.score(texts, list(gold))
        times.notes.setdefault("reward/accuracy", []).append(statistics.fmean(r.accuracy))
        times.notes.setdefault("reward/format", []).append(statistics.fmean(r.format))
        return r.total

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            with times.stage("generation"):
                return super()._generate_single_turn(*a, **k)

        def _get_per_token_logps_and_entropies(self, *a, **k):
            if torch.is_grad_enabled():  # the training forward: part of "training"
                return super()._get_per_token_logps_and_entropies(*a, **k)
            with times.stage("logprobs"):  # old / reference log-probs of the rollout
                return super()._get_per_token_logps_and_entropies(*a, **k)

    rows: list[dict[str, float]] = []

    class Log(TrainerCallback):
        t_step, tokens = 0.0, 0.0  # TRL logs num_tokens = input tokens seen so far (cumulative)

        def on_train_begin(self, args, state, control, **_):
            self.t_step = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **_):
            if not logs or "loss" not in logs:
                return
            now, (sec, notes) = time.perf_counter(), times.take()
            wall, self.t_step = now - self.t_step, now
            seen = float(logs.get("num_tokens", self.tokens))
            row = {"step": state.global_step, "reward/mean": logs.get("reward"), **notes,
                   "response/length_mean": logs.get("completions/mean_length"), "train/kl": logs.get("kl"),
                   "time/step": wall, "time/weight_update": 0.0, "perf/tokens_per_s": (seen - self.tokens) / wall,
                   "perf/peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0,
                   **{f"time/{k}": v for k, v in sec.items()}}  # fmt: skip
            self.tokens = seen
            row["time/training"] = wall - sum(sec.values())  # forward + backward + optimizer (+ TRL's bookkeeping)
            rows.append(row)
            with open(log_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    trainer = Timed(
        model=model, reward_funcs=[r1_rules], args=GRPOConfig(**kw), train_dataset=data, processing_class=tok,
        callbacks=[Log()],
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        scorer.close()
    trainer.save_model(str(out / "trl_final"))
    tok.save_pretrained(str(out / "trl_final"))


def copy_results(out: Path, dest: Path) -> Path:
    """What comes back from the device (the HF folders stay behind): metrics, eval results, logs and wandb runs, in
    one archive ``dest/e2e_results.tgz`` (a device command returns at most 8 files, 2 folders down). Each command's
    archive holds everything under ``out`` so far, so the last one is the whole run: unpack it, ``--stage report``."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "e2e_results.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for pattern in ("stages.json", "*.log", "*/metrics.jsonl", "eval_*/eval.json", "*/wandb/offline-run-*"):
            for src in sorted(out.glob(pattern)):
                tar.add(src, arcname=str(src.relative_to(out)))
    return path


# ---------------------------------------------------------------------------------------------- the report


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _eval(out: Path, name: str) -> dict[str, float]:
    p = out / name / "eval.json"
    return json.loads(p.read_text())["summary"]["gsm8k"] if p.is_file() else {}


def report(out: Path, stages: dict[str, dict]) -> str:
    """The table (markdown, also written to out/e2e_table.md) and out/e2e_curves.png."""
    runs = {"r1mega": _rows(out / "r1mega" / "metrics.jsonl"), "TRL": _rows(out / "trl" / "metrics.jsonl")}
    runs = {k: [r for r in v if "time/step" in r] for k, v in runs.items()}
    med = lambda rows, k: statistics.median([r[k] for r in rows if r.get(k) is not None]) if rows else float("nan")  # noqa: E731
    final = {"r1mega": "r1mega_final", "TRL": "trl_final"}
    lines = [
        "| | r1mega | TRL 1.16 (HF generate) |", "|---|---|---|",
        *[f"| median {k} (s) | {med(runs['r1mega'], 'time/' + k):.2f} | {med(runs['TRL'], 'time/' + k):.2f} |"
          for k in ("step", "generation", "logprobs", "training", "weight_update", "reward")],
        f"| tokens/s (median) | {med(runs['r1mega'], 'perf/tokens_per_s'):.0f} | "
        f"{med(runs['TRL'], 'perf/tokens_per_s'):.0f} |",
        f"| peak GPU memory (nvidia-smi, GiB) | {stages.get('r1mega', {}).get('peak_gpu_mib', 0) / 1024:.1f} | "
        f"{stages.get('trl', {}).get('peak_gpu_mib', 0) / 1024:.1f} |",
        f"| steps / stage wall (s) | {len(runs['r1mega'])} / {stages.get('r1mega', {}).get('wall_s', 0):.0f} | "
        f"{len(runs['TRL'])} / {stages.get('trl', {}).get('wall_s', 0):.0f} |",
    ]  # fmt: skip
    cold_g, cold_k = _eval(out, "eval_cold_greedy"), _eval(out, "eval_cold_k8")
    lines += ["", "| GSM8K test (1319) | greedy acc | +- se | pass@1 (k=8) | format rate |", "|---|---|---|---|---|"]
    for label, ck in (("cold start", "cold"), ("r1mega after", final["r1mega"]), ("TRL after", final["TRL"])):
        g, k = (cold_g, cold_k) if ck == "cold" else (_eval(out, f"eval_{ck}_greedy"), _eval(out, f"eval_{ck}_k8"))
        lines.append(f"| {label} | {g.get('pass@1', float('nan')):.4f} | {g.get('pass@1_se', float('nan')):.4f} | "
                     f"{k.get('pass@1', float('nan')):.4f} | {g.get('format_rate', float('nan')):.3f} |")  # fmt: skip
    table = "\n".join(lines)
    (out / "e2e_table.md").write_text(table + "\n")
    _plot(runs, out / "e2e_curves.png")
    return table


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward/mean", "reward"), ("reward/accuracy", "train accuracy"),
            ("response/length_mean", "response length"), ("train/kl", "KL to reference"),
            ("rollout/logp_diff_mean", "|dlogp| engine vs trainer")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (k, title) in zip(axes, keys):
        for name, rows in runs.items():
            pts = [(r["step"] if "step" in r else i + 1, r[k]) for i, r in enumerate(rows) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- the CLI

STAGES = ("cold", "r1mega", "trl", "eval", "report")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: compose the preset and check the TRL mapping")
    ap.add_argument("--out", default="/tmp/e2e")
    ap.add_argument("--stage", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    ap.add_argument("--timeout", type=int, default=570, help="seconds per stage (a device command: <= 600)")
    ap.add_argument("--results", help="copy the small artefacts (metrics, eval.json, logs) here, e.g. $OUT")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)  # the trl stage's own process
    ap.add_argument("overrides", nargs="*", help="r1mega Hydra overrides for every stage (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.dry_run:
        cfg = compose([f"model.hf_path={os.environ.get('SMOLLM2_HF', out / 'cold')}", *args.overrides])
        kw = check_mapping(cfg, str(out / "trl"))
        print(json.dumps({"trl_grpo_config": kw, "r1mega": r1mega_from_trl(kw)}, indent=1, default=str))
        for name, cmd in r1mega_cmds(out, args.overrides).items():
            print(f"{name}: {' '.join(cmd)}")
        return
    if args.trl_child:
        run_trl(out, args.overrides)
        return
    wanted = args.stage.split(",")  # stage groups (STAGES) or single stage names (eval_cold_greedy, ...)
    out.mkdir(parents=True, exist_ok=True)
    if wanted == ["report"]:  # on the CPU, from the files a device command brought back
        print(report(out, json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}))
        return
    check_mapping(compose([f"model.hf_path={os.environ.get('SMOLLM2_HF', '')}", *args.overrides]))  # before the GPU
    info_path = out / "stages.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    cmds = r1mega_cmds(out, args.overrides)
    for name in [n for n in cmds if n in wanted or (n.startswith("eval_") and "eval" in wanted)]:
        try:
            info[name] = run_stage(name, cmds[name], out, args.timeout)
        finally:
            info_path.write_text(json.dumps(info, indent=1))
            if args.results:
                copy_results(out, Path(args.results))
    if "report" in wanted:
        print(report(out, info))
        print(f"curves: {out / 'e2e_curves.png'}; table: {out / 'e2e_table.md'}")


if __name__ == "__main__":
    main()
