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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is no package: its e2e_report beside this file
from e2e_report import report  # noqa: E402
from e2e_stages import (  # noqa: E402  (the GPU job's stage commands, runner and preflight)
    compose,
    copy_results,
    preflight,
    r1mega_cmds,
    rl_minutes,
    run_stage,
    salvage_cmd,
)
from e2e_trl_side import run_trl  # noqa: E402

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
        cmds = r1mega_cmds(out, args.overrides, rl_minutes(cfg.train.max_minutes, args.timeout), args.fp8)
        for name, cmd in cmds.items():
            print(f"{name}: {' '.join(cmd)}")
        preflight(cmds, list(cmds))  # every stage's config, as the GPU job composes it before its first stage
        print("preflight: every r1mega stage composes")
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
    preflight(r1mega_cmds(out, args.overrides, minutes, args.fp8, fp8_minutes), wanted)  # before the GPU, too
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
            if export := salvage_cmd(out, name, cmds):  # its latest checkpoint as its HF folder, for the next eval
                try:
                    info[f"{key}_export"] = run_stage(f"{key}_export", export, out, args.timeout)
                except (SystemExit, subprocess.TimeoutExpired) as e2:
                    info[f"{key}_export"] = {"failed": str(e2)[:300]}
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
