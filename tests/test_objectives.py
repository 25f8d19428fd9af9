"""Objectives plug into the engine by config: a new loss file runs (its loss against an fp64 formula), the
kernel choice is explicit (a variant the kernel lacks runs the PyTorch loss and says so), and a DAPO step
with nothing to learn is skipped and counted instead of crashing."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from r1mega.config import ConfigError
from r1mega.objectives.base import MetricsSchema
from tests.test_trainer import small_config


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(small_config().parallel, seed=3, device="cpu")
    yield rt
    shutdown_runtime()


def _trainer(cfg, rt, scorer):
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.rollout import build_rollout_engine
    from r1mega.trainer import GRPOTrainer, PromptSampler

    tok = CharTokenizer()
    train, _ = load_problems(cfg.data)
    policy = MegatronEngine(cfg, rt, tok.vocab_size)
    engine = build_rollout_engine(cfg, policy.weights, tok)
    return GRPOTrainer(cfg, policy, engine, scorer, tok, PromptSampler(train, cfg.rollout.prompts_per_step, 0, 1, 0))


def test_new_loss_file_runs_from_config(runtime):
    """algo.loss=module:Class builds the user's objective; its loss is the fp64 formula on the pre-step log-probs."""
    from r1mega.rewards import RewardScorer
    from tests.example_loss import UnclippedPG
    from tests.parallel_worker import make_batch

    cfg = small_config()
    cfg.algo.loss, cfg.algo.beta = "tests.example_loss:UnclippedPG", 0.0
    with RewardScorer(cfg.reward) as scorer:
        trainer = _trainer(cfg, runtime, scorer)
        assert isinstance(trainer.objective, UnclippedPG)
        policy = trainer.policy
        batch, noise_old, _ = make_batch(policy.vocab_size)
        logp, _ = policy.compute_logprobs(batch, trainer.objective.temperature)
        batch.old_logp = (logp + noise_old) * batch.mask
        m = policy.forward_backward(batch, trainer.objective, lr=1e-3)
        lp, old, adv, mask = (t.double() for t in (logp, batch.old_logp, batch.advantages, batch.mask))
        want = float(-(adv * torch.exp(lp - old) * mask).sum() / mask.sum())
        assert m["loss"] == pytest.approx(want, rel=1e-5) and m["update_ok"] == 1.0
        step = trainer.step(0)  # the whole GRPO step with the user's loss and its metrics schema
    assert math.isfinite(step["train/loss"]) and step["train/ratio_mean"] > 0 and "train/clip_frac" not in step


def test_kernel_choice_is_explicit_and_logged(caplog):
    from r1mega.objectives.grpo import GRPOKernel, GRPOObjective, GRPOSettings, choose_impl

    token = GRPOSettings(0.2, 0.2, 0.0)
    gspo = GRPOSettings(3e-4, 4e-4, 0.0, ratio_level="sequence")
    assert GRPOKernel.supports(token) == (True, "") and not GRPOKernel.supports(gspo)[0]
    with caplog.at_level(logging.WARNING, logger="r1mega.objectives.grpo"):
        assert choose_impl(token, on_gpu=True, kernels_available=True) == "kernel"
        assert choose_impl(token, on_gpu=False, kernels_available=False) == "torch"  # auto on the CPU
        assert not caplog.records
        assert choose_impl(gspo, on_gpu=True, kernels_available=True) == "torch"  # the GPU would have used it
    assert len(caplog.records) == 1 and "PyTorch path" in caplog.text and "ratio_level='sequence'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1mega.objectives.grpo"):
        assert choose_impl(gspo, on_gpu=False, kernels_available=False) == "torch"  # nothing would differ: quiet
        objective = GRPOObjective(
            GRPOSettings(3e-4, 4e-4, 0.0, ratio_level="sequence", impl="triton"), torch.device("cpu")
        )
        assert objective.impl == "torch"
    assert len(caplog.records) == 1  # once, when the objective is built
    assert choose_impl(GRPOSettings(0.2, 0.2, 0.0, impl="torch"), on_gpu=True, kernels_available=True) == "torch"
    with pytest.raises(ConfigError, match="algo.loss_impl=triton"):
        choose_impl(GRPOSettings(0.2, 0.2, 0.0, impl="triton"), on_gpu=False, kernels_available=False)


def test_settings_by_name_and_training_temperature():
    from r1mega.objectives.grpo import GRPOSettings

    cfg = small_config()
    cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.loss_agg = 0.1, 0.3, "token-mean"
    cfg.rollout.sampling.temperature = 0.8
    s = GRPOSettings.from_config(cfg)
    assert (s.eps_low, s.eps_high, s.beta, s.loss_agg, s.max_len) == (0.1, 0.3, 0.01, "token-mean", 24)
    assert s.temperature == 0.8  # the sampling temperature unless algo.temperature is set
    cfg.algo.temperature = 0.6
    assert GRPOSettings.from_config(cfg).temperature == 0.6


def test_dapo_step_with_nothing_to_learn_is_skipped(runtime):
    """Every group's rewards equal (here: all 0) -> DAPO masks every answer: no optimizer step, train/skipped=1."""
    from r1mega.rewards import RewardScorer

    cfg = small_config()
    cfg.algo.dynamic_sampling, cfg.algo.beta = True, 0.0
    cfg.reward.accuracy_weight = cfg.reward.format_weight = 0.0
    with RewardScorer(cfg.reward) as scorer:
        trainer = _trainer(cfg, runtime, scorer)
        before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items() if torch.is_tensor(v)}
        m = trainer.step(0)
        after = trainer.policy.model.state_dict()
    assert m["train/skipped"] == 1.0 and "train/loss" not in m and math.isfinite(m["reward/mean"])
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "a skipped step must not move the weights"


def test_metrics_schema_averages_over_the_steps_that_ran():
    schema = MetricsSchema({"kl": "train/kl"})
    steps = [{"skipped": 1.0}, {"loss": 2.0, "grad_norm": 1.0, "tokens": 10.0, "kl": 1.0}]
    steps.append({"loss": 4.0, "grad_norm": 3.0, "tokens": 30.0, "kl": 7.0})
    got = schema.summarize(steps)
    assert got == {"train/skipped": pytest.approx(1 / 3), "train/loss": 3.0, "train/grad_norm": 2.0, "train/kl": 0.2}


def test_fused_lm_head_train_refuses_a_logits_only_loss_before_building(tmp_path, monkeypatch):
    """train.fused_lm_head_train with a plug-in loss that needs the whole logits (no loss_from_logprobs): a clear
    error naming the switch and the fix, from r1mega.train.run before any rank or model exists."""
    import r1mega.parallel.runtime as runtime_mod
    from r1mega.train import run

    def no_runtime(*_a, **_k):
        raise AssertionError("the run got as far as starting its ranks")

    monkeypatch.setattr(runtime_mod, "init_runtime", no_runtime)
    cfg = small_config()
    cfg.algo.loss, cfg.algo.beta, cfg.train.fused_lm_head_train = "tests.example_loss:UnclippedPG", 0.0, True
    cfg.logging.out_dir, cfg.logging.wandb_mode = str(tmp_path / "run"), "disabled"
    with pytest.raises(ConfigError, match=r"fused_lm_head_train=true.*UnclippedPG.*loss_from_logprobs"):
        run(cfg)
