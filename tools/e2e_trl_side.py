"""TRL's side of tools/bench_e2e_trl.py: its GRPOTrainer on r1mega's RL prompts and reward code, timed per stage
in the same key names as r1mega's metrics.jsonl (run in its own process: ``bench_e2e_trl.py --trl-child``)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any


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


def run_trl(out: Path, cfg, kw: dict[str, Any]) -> None:
    """TRL's GRPOTrainer from the cold-start folder on r1mega's RL prompts; metrics.jsonl in r1mega's key names.
    ``cfg``: r1mega's config of the run; ``kw``: its GRPOConfig arguments (bench_e2e_trl.check_mapping)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1mega.data.tokenizer import end_of_turn_id
    from r1mega.rewards import RewardScorer

    cold, log_dir = out / "cold", out / "trl"
    log_dir.mkdir(parents=True, exist_ok=True)
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

    class StopAfter(TrainerCallback):
        """r1mega's ``train.max_minutes`` for TRL: stop after the step that passes it, so the model is still saved
        (bench_e2e_trl caps it below the stage's hard timeout; TRL has no wall-time limit of its own)."""

        started = 0.0

        def on_train_begin(self, args, state, control, **_):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            limit = cfg.train.max_minutes
            if limit and (time.perf_counter() - self.started) / 60 > limit:
                print(f"train.max_minutes={limit} reached after step {state.global_step}", flush=True)
                control.should_training_stop = True

    trainer = Timed(
        model=model, reward_funcs=[r1_rules], args=GRPOConfig(**kw), train_dataset=data, processing_class=tok,
        callbacks=[Log(), StopAfter()],
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        scorer.close()
    trainer.save_model(str(out / "trl_final"))
    tok.save_pretrained(str(out / "trl_final"))
