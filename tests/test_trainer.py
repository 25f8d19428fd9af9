"""A 3-step GRPO run changes the weights and logs every metric; the CLI wires Hydra, wandb and the plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1mega.config import Config

REQUIRED_METRICS = [
    "reward/mean",
    "reward/accuracy",
    "reward/format",
    "reward/timeouts",
    "reward/errors",
    "response/length_mean",
    "response/finished_frac",
    "train/loss",
    "train/kl",
    "train/clip_frac",
    "train/entropy",
    "train/grad_norm",
    "rollout/logp_diff_mean",
    "rollout/logp_diff_max",
    "time/generation",
    "time/reward",
    "time/logprobs",
    "time/training",
    "time/weight_update",
    "time/step",
    "perf/tokens_per_s",
    "perf/gen_tokens_per_s",
]


def small_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.max_position_embeddings = 2, 64, 128, 64
    m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size = 4, 32, 32
    cfg.data.template, cfg.data.arith_ops, cfg.data.num_eval = "compact", "+", 8
    cfg.rollout.prompts_per_step, cfg.rollout.sampling.max_new_tokens = 4, 24
    cfg.algo.group_size, cfg.algo.num_minibatches, cfg.algo.beta = 4, 2, 0.01
    cfg.optim.lr = 1e-3
    cfg.train.micro_batch_size = 8
    cfg.reward.num_workers = 1
    return cfg


def test_three_grpo_steps_change_weights_and_log_every_metric():
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.rewards import RewardScorer
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.trainer import GRPOTrainer, PromptSampler

    cfg = small_config()
    rt = init_runtime(cfg.parallel, seed=3, device="cpu")
    try:
        tok = CharTokenizer()
        train, _ = load_problems(cfg.data)
        policy = MegatronEngine(cfg, rt, tok.vocab_size)
        engine = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 64, 64)
        before = {k: v.detach().clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v)}
        ref_before = {k: v.detach().clone() for k, v in policy.ref_model.state_dict().items() if torch.is_tensor(v)}
        with RewardScorer(cfg.reward) as scorer:
            trainer = GRPOTrainer(cfg, policy, engine, scorer, tok, PromptSampler(train, 4, 0, 1, 0))
            history = [trainer.step(s) for s in range(3)]
        after = policy.model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        weights = [k for k in before if k.endswith("weight")]
        assert set(weights) <= set(changed), f"unchanged: {sorted(set(weights) - set(changed))}"
        bias_keys = [k for k in before if k.endswith("expert_bias")]
        assert bias_keys and all(k in changed for k in bias_keys), "aux-loss-free expert bias must update"
        ref_after = policy.ref_model.state_dict()
        assert all(torch.equal(v, ref_after[k]) for k, v in ref_before.items()), "the reference must stay frozen"
        for m in history:
            missing = [k for k in REQUIRED_METRICS if k not in m]
            assert not missing, missing
            assert all(math.isfinite(m[k]) for k in REQUIRED_METRICS)
            assert 0.0 <= m["reward/accuracy"] <= 1.0 and 0.0 <= m["train/clip_frac"] <= 1.0
            assert m["rollout/logp_diff_max"] < 1e-4, "rollout and trainer log-probs must agree on the CPU"
            assert m["train/entropy"] > 0 and m["time/step"] > 0
        assert history[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
        assert history[2]["train/kl"] > 0
    finally:
        shutdown_runtime()


def _cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "r1mega.train", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_run_logs_wandb_metrics_and_plot(tmp_path):
    out = tmp_path / "run"
    proc = _cli(
        [
            "sft.steps=3",
            "train.steps=2",
            "rollout.prompts_per_step=4",
            "algo.group_size=2",
            "data.num_eval=8",
            "train.eval_samples=1",
            "model.num_layers=1",
            "train.threads=1",
            f"logging.out_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out before RL" in proc.stderr and "held-out after RL" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2 and all(k in steps[0] for k in REQUIRED_METRICS)
    assert any("eval/greedy_accuracy" in r for r in rows)
    assert (out / "reward_curve.png").stat().st_size > 10_000
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"


def test_cli_rejects_misspelled_key_and_bad_value(tmp_path):
    proc = _cli(["algo.betaa=0"], tmp_path)
    assert proc.returncode != 0
    assert "betaa" in proc.stderr
    proc = _cli(["algo.group_size=1", f"logging.out_dir={tmp_path / 'x'}"], tmp_path)
    assert proc.returncode == 2
    assert "algo.group_size" in proc.stderr


def test_hydra_types_and_presets():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from r1mega.config import ConfigError, register_configs, validate
    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        with pytest.raises(ConfigCompositionException, match="beta"):
            compose("config", overrides=["algo.beta=abc"])
        with pytest.raises(ConfigCompositionException, match="num_layerz"):
            compose("config", overrides=["model.num_layerz=3"])
        for algo in ("grpo", "dapo", "dr_grpo", "gspo"):
            cfg = OmegaConf.to_object(compose("config", overrides=[f"algo={algo}"]))
            validate(cfg)
        r1 = OmegaConf.to_object(compose("config", overrides=["+preset=r1_zero"]))
        assert (r1.optim.lr, r1.algo.beta, r1.algo.group_size, r1.algo.ref_reset_every) == (3e-6, 0.001, 16, 400)
        assert r1.rollout.prompts_per_step // r1.algo.num_minibatches == 32  # 32 questions per optimizer step
        bad = OmegaConf.to_object(compose("config", overrides=["parallel.ep=3"]))
        with pytest.raises(ConfigError, match="parallel.ep"):
            validate(bad, world_size=4)
