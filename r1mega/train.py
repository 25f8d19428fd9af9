"""``r1mega-train``: the Hydra entry point. Builds the runtime, policy, rollout engine and rewards,
runs the optional cold-start SFT, evaluates, trains with GRPO, evaluates again, and plots.

    r1mega-train                                   # the embedded default: tiny MoE, arithmetic, CPU
    r1mega-train algo=dapo algo.beta=0 rollout.prompts_per_step=64
    torchrun --nproc_per_node 2 -m r1mega.train parallel.ep=2
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF_DIR = os.environ.get("R1MEGA_CONF", str(Path(__file__).resolve().parent / "conf"))  # shipped in the wheel


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


def run(cfg) -> dict[str, float]:
    """Train with the typed ``Config``: build -> (resume) -> SFT -> eval -> RL loop -> eval; teardown always.

    Returns the summary (held-out accuracy before / after RL). Raises :class:`RunStopped` (after the checkpoint
    and the teardown) when a stop signal or ``train.max_bad_steps`` ended the loop early.
    """
    from r1mega.config import validate
    from r1mega.grpo.fused_lm_head import check_objective
    from r1mega.model.hf_io import maybe_export_hf
    from r1mega.model.hf_load import resolve_model_config
    from r1mega.parallel.runtime import dist_env_from_environ, init_runtime, shutdown_runtime
    from r1mega.registry import ADVANTAGES, LOSSES
    from r1mega.rollout import rollout_engine_class
    from r1mega.run_identity import RunIdentity

    t_start = time.perf_counter()
    cfg.model = resolve_model_config(cfg.model)  # model.hf_path: the architecture from its config.json
    validate(cfg, world_size=dist_env_from_environ().world_size)
    if cfg.train.save_dir is None:  # a run without a save_dir still never loses its trained model
        cfg.train.save_dir = str(Path(cfg.logging.out_dir) / "checkpoints")
    loss_cls, _, _ = LOSSES.get(cfg.algo.loss), ADVANTAGES.get(cfg.algo.advantage), rollout_engine_class(cfg)
    check_objective(loss_cls, cfg.train.fused_lm_head_train)  # plug-ins import and fit, before any model is built
    with ExitStack() as teardown:  # unwinds in reverse on any exit: engine, scorer, tracker, runtime, run lock
        identity = RunIdentity(cfg.logging.out_dir, cfg.train.save_dir, enabled=dist_env_from_environ().rank == 0)
        teardown.callback(identity.close)
        runtime = init_runtime(cfg.parallel, cfg.train.seed, cfg.train.device, cfg.train.threads)
        teardown.callback(shutdown_runtime)
        r = _build(cfg, runtime, teardown, identity.run_id)
        start_step = _resume_or_init(cfg, r)
        r.tracker.resume_from(start_step)  # a resumed run continues metrics.jsonl without duplicate steps
        before = _before_rl(cfg, r, start_step)
        if (stop := _rl_loop(cfg, r, start_step)).status:
            raise RunStopped(stop.stop, stop.status)  # a signal or max_bad_steps: no final evaluation
        after = r.trainer.evaluate(r.eval_set, cfg.train.eval_samples)
        r.tracker.log(after, step=cfg.train.steps)
        r.console.print(f"held-out after RL:  {_fmt(after)}")
        maybe_export_hf(cfg, r.policy, None)  # train.export_hf_dir: the final model as a HF folder
        summary = {
            **{f"before/{k}": v for k, v in before.items()},
            **{f"after/{k}": v for k, v in after.items()},
            "wall_s": time.perf_counter() - t_start,
        }
        r.tracker.summary(summary)
        if cfg.logging.plot and (path := r.tracker.plot_rewards(before, after)) is not None:
            r.console.print(f"reward curve: {path}")
        r.console.print(f"done in {summary['wall_s']:.0f} s; metrics in {cfg.logging.out_dir}/metrics.jsonl")
    return summary


class RunStopped(Exception):
    """The RL loop ended before ``train.steps``, its state saved. ``status``: the exit status of r1mega-train,
    128 + signum for a stop signal (SIGINT 130, SIGUSR1 138, SIGTERM 143: the shell's convention for "ended by
    that signal", so a script does not mistake the stop for a finished run), 1 for ``train.max_bad_steps``."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Run:
    """What one run builds (and ``run``'s ExitStack tears down)."""

    console: Any
    policy: Any
    trainer: Any
    tracker: Any
    train_set: list
    eval_set: list
    sft_set: list  # the cold-start demonstrations (held out from train_set when sft.path is set)
    tokenizer: Any


def _build(cfg, runtime, teardown: ExitStack, run_id: str) -> _Run:
    from megatron.core import parallel_state
    from omegaconf import OmegaConf
    from rich.console import Console

    from r1mega.data.cold_start import split_cold_start
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.eval.training import check_training_sets
    from r1mega.rewards import RewardScorer
    from r1mega.rollout import build_rollout_engine
    from r1mega.tracking import Tracker
    from r1mega.trainer import GRPOTrainer, PromptSampler

    console = Console(stderr=True, quiet=not runtime.is_main, soft_wrap=True)  # one line per message: grep-able logs
    tokenizer = build_tokenizer(cfg.model.tokenizer)
    train_set, eval_set = load_problems(cfg.data)
    train_set, sft_set = split_cold_start(train_set, eval_set, cfg)
    policy = MegatronEngine(cfg, runtime, cfg.model.vocab_size or tokenizer.vocab_size)
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.print(
        f"[bold]r1mega[/] {cfg.model.name}: {n_params / 1e6:.2f} M params on this rank, "
        f"world {runtime.env.world_size} (tp {cfg.parallel.tp} pp {cfg.parallel.pp} ep {cfg.parallel.ep}), "
        f"device {runtime.device}, {len(train_set)} train / {len(eval_set)} held-out problems"
    )
    lg = cfg.logging
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    tracker = Tracker(
        lg.out_dir, lg.wandb_mode, lg.project, lg.run_name, config_dict, enabled=runtime.is_main, run_id=run_id
    )
    teardown.callback(tracker.finish)
    engine = build_rollout_engine(cfg, policy.weights, tokenizer)
    teardown.callback(engine.shutdown)
    scorer = teardown.enter_context(RewardScorer(cfg.reward))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    sampler = PromptSampler(train_set, cfg.rollout.prompts_per_step, dp_rank, dp_size, cfg.data.seed)
    trainer = GRPOTrainer(cfg, policy, engine, scorer, tokenizer, sampler)
    check_training_sets(cfg, tokenizer, eval_set, getattr(engine, "max_seq_len", None))  # eval.sets, before any step
    return _Run(console, policy, trainer, tracker, train_set, eval_set, sft_set, tokenizer)


def _resume_or_init(cfg, r: _Run) -> int:
    """The first RL step: from the latest checkpoint under train.save_dir, else 0 (from model.checkpoint or the
    HF weights of model.hf_path)."""
    from r1mega.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from r1mega.model.hf_load import load_hf_weights

    resume_from = latest_checkpoint(cfg.train.save_dir) if cfg.train.resume else None
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, r.policy)
        r.console.print(f"resumed from {resume_from} at step {start_step}")
        return start_step
    if cfg.model.checkpoint:
        load_model(r.policy.model, cfg.model.checkpoint)
        r.policy.reset_reference()
    elif cfg.model.hf_path:
        load_hf_weights(r.policy.model, cfg.model)
        r.policy.optimizer.reload_model_params()  # bf16: refresh the optimizer's fp32 main copies
        r.policy.reset_reference()
    return 0


def _before_rl(cfg, r: _Run, start_step: int) -> dict[str, float]:
    """Cold-start SFT (fresh runs only), then the held-out evaluation before RL (a resumed run has done it:
    only with ``train.eval_before_on_resume``)."""
    from r1mega.sft import cold_start_sft

    if cfg.sft.steps > 0 and start_step == 0:
        t0 = time.perf_counter()
        losses = cold_start_sft(cfg, r.policy, r.sft_set, r.tokenizer)
        r.console.print(
            f"cold-start SFT: {cfg.sft.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        r.policy.reset_reference()  # the RL reference is the SFT model, as in R1
    if start_step and not cfg.train.eval_before_on_resume:
        return {}
    before = r.trainer.evaluate(r.eval_set, cfg.train.eval_samples)
    r.tracker.log(before, step=0)
    r.console.print(f"held-out before RL: {_fmt(before)}")
    return before


def _rl_loop(cfg, r: _Run, start_step: int):
    """The GRPO steps; returns the cadence's last ``Due`` (its ``stop`` / ``status`` say why it ended early).

    SIGTERM / SIGINT / SIGUSR1 (scancel, requeue, Ctrl-C, Slurm's ``--signal=B:USR1@N``) finish the current step,
    which then saves like any stop; the ranks agree on a signal one of them got (an all-reduce per step).
    """
    from tqdm import tqdm

    from r1mega.cadence import Cadence, Due
    from r1mega.checkpoint import latest_checkpoint, save_checkpoint
    from r1mega.memory import EngineMemoryError
    from r1mega.model.hf_io import maybe_export_hf
    from r1mega.rollout.base import NonFiniteError
    from r1mega.signals import StopSignals
    from r1mega.trainer import alignment_stop_reason

    show = r.policy.runtime.is_main and cfg.logging.progress
    bar = tqdm(range(start_step, cfg.train.steps), desc="GRPO", disable=not show, dynamic_ncols=True)
    cadence = Cadence(cfg.train)
    saved_step = start_step - 1  # the step the newest checkpoint holds
    with StopSignals() as signals:
        for step in bar:
            try:
                metrics = r.trainer.step(step)
            except NonFiniteError as e:  # the weights the step guard protects came non-finite from elsewhere
                why = f"step {step + 1} (after {step} steps): {e}"
                r.console.print(f"stopping: {why}; latest checkpoint: {latest_checkpoint(cfg.train.save_dir)}")
                return Due(stop=why, status=1)
            except EngineMemoryError as e:  # raised before this step generated: the policy is the last step's
                if saved_step < step - 1:
                    save_checkpoint(cfg.train.save_dir, step - 1, r.policy)
                why = f"step {step + 1} (after {step} steps): {e}"
                r.console.print(f"stopping: {why}; checkpoint {latest_checkpoint(cfg.train.save_dir)}")
                return Due(stop=why, status=1)
            metrics["train/bad_steps"] = cadence.count_step(metrics.get("train/step_skipped", 0.0) > 0)
            r.tracker.log(metrics, step=step + 1)
            bar.set_postfix({short: f"{metrics[k]:.3g}" for short, k in _BAR.items() if k in metrics})
            if signum := int(r.policy.reduce_max(float(signals.received[0] if signals.received else 0))):
                cadence.request_stop(f"{signal.Signals(signum).name} received", status=128 + signum)
            if reason := alignment_stop_reason(metrics, step, cfg.rollout.max_logp_gap):
                cadence.request_stop(reason)  # saved and reported like any stop
            due = cadence.after(step)
            saved = save_checkpoint(cfg.train.save_dir, step, r.policy) if due.save else None
            saved_step = step if saved else saved_step
            if due.eval:
                r.tracker.log(r.trainer.evaluate(r.eval_set, cfg.train.eval_samples), step=step + 1)
            maybe_export_hf(cfg, r.policy, step + 1)  # train.export_hf_every
            if due.stop:
                where = saved or latest_checkpoint(cfg.train.save_dir)
                again = "; run the same command to resume" if due.status > 128 else ""  # a signal
                r.console.print(f"stopping after {step + 1} steps: {due.stop}; checkpoint {where}{again}")
                return due
    return Due()


_BAR = {"acc": "reward/accuracy", "fmt": "reward/format", "kl": "train/kl", "len": "response/length_mean"}


def _fmt(ev: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in ev.items())


def main() -> None:
    _quiet()
    import hydra

    from r1mega.config import ConfigError, config_from_hydra, register_configs

    register_configs()

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
    def _hydra_main(dcfg) -> None:
        from r1mega.memory import EngineMemoryError
        from r1mega.rollout.base import NonFiniteError

        try:
            run(config_from_hydra(dcfg))
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as e:  # already reported by the loop, with the checkpoint
            sys.exit(e.status)
        except (NonFiniteError, EngineMemoryError) as e:  # e.g. NaN weights in model.checkpoint, a GPU too full:
            print(f"r1mega-train: {e}", file=sys.stderr)  # before RL (during it, the loop stops and saves)
            sys.exit(1)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the RL loop: one line, not a traceback
            print("r1mega-train: interrupted (SIGINT); train.save_dir keeps its latest checkpoint", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)

    _hydra_main()


if __name__ == "__main__":
    main()
