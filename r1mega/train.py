"""``r1mega-train``: the Hydra entry point. Builds the runtime, policy, rollout engine and rewards,
runs the optional cold-start SFT, evaluates, trains with GRPO, evaluates again, and plots.

    r1mega-train                                   # the embedded default: tiny MoE, arithmetic, CPU
    r1mega-train algo=dapo algo.beta=0 rollout.prompts_per_step=64
    torchrun --nproc_per_node 2 -m r1mega.train parallel.ep=2
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

CONF_DIR = os.environ.get("R1MEGA_CONF", str(Path(__file__).resolve().parents[1] / "conf"))


def _quiet() -> None:
    # megatron warns at import about missing TE/apex and deprecated paths; the static engine draws a
    # progress bar per generate() call. Neither is actionable for a user of this trainer.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.getLogger("megatron").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def build_engine(cfg, policy, tokenizer):
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine

    if cfg.rollout.backend == "megatron":
        max_seq = cfg.data.max_prompt_len + cfg.rollout.sampling.max_new_tokens
        return MegatronRolloutEngine(policy.model, tokenizer, policy.padded_vocab, cfg.rollout.max_batch_size, max_seq)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine  # GPU only; imported lazily

    return SGLangRolloutEngine(cfg, policy, tokenizer)


def run(cfg) -> dict[str, float]:
    """Train with the typed ``Config``; returns the final summary (held-out accuracy before / after)."""
    from megatron.core import parallel_state
    from rich.console import Console
    from tqdm import tqdm

    from r1mega.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
    from r1mega.config import validate
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.model.hf_io import maybe_export_hf
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config
    from r1mega.parallel.runtime import dist_env_from_environ, init_runtime, shutdown_runtime
    from r1mega.policy import Policy
    from r1mega.rewards import RewardScorer
    from r1mega.sft import cold_start_sft
    from r1mega.tracking import Tracker
    from r1mega.trainer import GRPOTrainer, PromptSampler

    t_start = time.perf_counter()
    cfg.model = resolve_model_config(cfg.model)  # model.hf_path: the architecture from its config.json
    validate(cfg, world_size=dist_env_from_environ().world_size)
    runtime = init_runtime(cfg.parallel, cfg.train.seed, cfg.train.device, cfg.train.threads)
    console = Console(stderr=True, quiet=not runtime.is_main)
    tokenizer = build_tokenizer(cfg.model.tokenizer)
    train_set, eval_set = load_problems(cfg.data)
    policy = Policy(cfg, runtime, cfg.model.vocab_size or tokenizer.vocab_size)
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.print(
        f"[bold]r1mega[/] {cfg.model.name}: {n_params / 1e6:.2f} M params on this rank, "
        f"world {runtime.env.world_size} (tp {cfg.parallel.tp} pp {cfg.parallel.pp} ep {cfg.parallel.ep}), "
        f"device {runtime.device}, {len(train_set)} train / {len(eval_set)} held-out problems"
    )
    from omegaconf import OmegaConf

    tracker = Tracker(
        cfg.logging.out_dir,
        cfg.logging.wandb_mode,
        cfg.logging.project,
        cfg.logging.run_name,
        OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        enabled=runtime.is_main,
    )
    engine = build_engine(cfg, policy, tokenizer)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    sampler = PromptSampler(train_set, cfg.rollout.prompts_per_step, dp_rank, dp_size, cfg.data.seed)
    start_step = 0
    resume_from = latest_checkpoint(cfg.train.save_dir) if cfg.train.resume else None
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, policy)
        console.print(f"resumed from {resume_from} at step {start_step}")
    elif cfg.model.checkpoint:
        load_model(policy.model, cfg.model.checkpoint)
        policy.reset_reference()
    elif cfg.model.hf_path:
        load_hf_weights(policy.model, cfg.model)
        policy.optimizer.reload_model_params()  # bf16: the fp32 main copies
        policy.reset_reference()
    with RewardScorer(cfg.reward) as scorer:
        trainer = GRPOTrainer(cfg, policy, engine, scorer, tokenizer, sampler)
        if cfg.sft.steps > 0 and resume_from is None:
            t0 = time.perf_counter()
            losses = cold_start_sft(cfg, policy, train_set, tokenizer)
            console.print(
                f"cold-start SFT: {cfg.sft.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
            policy.reset_reference()  # the RL reference is the SFT model, as in R1
        before = trainer.evaluate(eval_set, cfg.train.eval_samples)
        tracker.log(before, step=0)
        console.print(f"held-out before RL: {_fmt(before)}")
        bar = tqdm(
            range(start_step, cfg.train.steps),
            desc="GRPO",
            disable=not (runtime.is_main and cfg.logging.progress),
            dynamic_ncols=True,
        )
        rl_start = time.perf_counter()
        for step in bar:
            metrics = trainer.step(step)
            tracker.log(metrics, step=step + 1)
            bar.set_postfix(
                acc=f"{metrics['reward/accuracy']:.2f}",
                fmt=f"{metrics['reward/format']:.2f}",
                kl=f"{metrics['train/kl']:.4f}",
                len=f"{metrics['response/length_mean']:.0f}",
            )
            if cfg.train.save_dir and cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
                save_checkpoint(cfg.train.save_dir, step, policy)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                tracker.log(trainer.evaluate(eval_set, cfg.train.eval_samples), step=step + 1)
            maybe_export_hf(cfg, policy, step + 1)
            if cfg.train.max_minutes and (time.perf_counter() - rl_start) / 60 > cfg.train.max_minutes:
                console.print(f"stopping after {step + 1} steps: train.max_minutes={cfg.train.max_minutes} reached")
                break
        after = trainer.evaluate(eval_set, cfg.train.eval_samples)
        tracker.log(after, step=cfg.train.steps)
    maybe_export_hf(cfg, policy, None)
    console.print(f"held-out after RL:  {_fmt(after)}")
    summary = {
        **{f"before/{k}": v for k, v in before.items()},
        **{f"after/{k}": v for k, v in after.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    tracker.summary(summary)
    if cfg.logging.plot:
        path = tracker.plot_rewards(before, after)
        if path is not None:
            console.print(f"reward curve: {path}")
    tracker.finish()
    console.print(f"done in {summary['wall_s']:.0f} s; metrics in {cfg.logging.out_dir}/metrics.jsonl")
    engine.shutdown()
    shutdown_runtime()
    return summary


def _fmt(ev: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in ev.items())


def main() -> None:
    _quiet()
    import hydra
    from omegaconf import OmegaConf

    from r1mega.config import ConfigError, register_configs

    register_configs()

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
    def _hydra_main(dcfg) -> None:
        cfg = OmegaConf.to_object(dcfg)
        try:
            run(cfg)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)

    _hydra_main()


if __name__ == "__main__":
    main()
