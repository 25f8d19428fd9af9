"""DAPO's dynamic sampling (issue 14, fault 7): ``algo.dynamic_sampling=resample`` generates extra rounds of groups
(round r: ``PromptSampler.batch(step, r)``) until ``rollout.prompts_per_step`` informative groups are collected,
at most ``algo.max_sample_rounds`` rounds; exact (the first informative groups in round order, against a brute-force
regeneration of every round), a pure function of the step and the weights, and in lockstep over data-parallel
ranks (expert parallelism makes every generation collective: ranks that disagreed on the rounds would hang)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from r1mega.config import AlgoConfig, ConfigError
from r1mega.data.sampler import PromptSampler
from r1mega.data.tasks import Problem
from tests.test_objectives import _trainer, runtime  # noqa: F401 (the module-scoped runtime fixture)
from tests.test_trainer import small_config


def test_mode_is_a_checked_choice_and_the_former_bools_still_work():
    assert AlgoConfig().dynamic_sampling == "none"
    assert AlgoConfig(dynamic_sampling=True).dynamic_sampling == "mask"
    assert AlgoConfig(dynamic_sampling="false").dynamic_sampling == "none"  # `algo.dynamic_sampling=false`
    with pytest.raises(ConfigError, match=r"algo.dynamic_sampling='always' is not one of \['none', 'mask', 'resample'"):
        AlgoConfig(dynamic_sampling="always")
    with pytest.raises(ConfigError, match="algo.max_sample_rounds=0 must be > 0"):
        AlgoConfig(max_sample_rounds=0)


def test_extra_rounds_are_a_pure_function_of_step_and_round():
    problems = [Problem(str(i), str(i)) for i in range(50)]
    a, b = PromptSampler(problems, 8, 0, 1, seed=3), PromptSampler(problems, 8, 0, 1, seed=3)
    for step in (0, 7, 30):  # 30 * 8 crosses epochs
        assert [p.question for p in a.batch(step, 2)] == [p.question for p in b.batch(step, 2)]
    first, extra = a.batch(4), a.batch(4, 1)
    assert first == b.batch(4, 0) and [p.question for p in first] != [p.question for p in extra]
    assert len(set(p.question for p in a.batch(0, 1) + a.batch(1, 1) + a.batch(5, 1))) == 24  # one epoch: no repeats


def _cold_started(cfg, rt, scorer):
    """A trainer whose policy got a short cold-start SFT, so that some groups (not all) carry a signal."""
    from r1mega.data.tasks import load_problems
    from r1mega.sft import cold_start_sft

    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.num_examples, cfg.sft.lr = 120, 16, 256, 3e-3
    trainer = _trainer(cfg, rt, scorer)
    cold_start_sft(cfg, trainer.policy, load_problems(cfg.data)[0], trainer.tokenizer)
    return trainer


def _round(trainer, step: int, r: int):
    """Brute force: round r of step ``step`` as the contract says (sampler.batch(step, r), seed + 100_003 r)."""
    from r1mega.data.tasks import encode_prompt
    from r1mega.grpo.advantages import informative_groups
    from r1mega.rollout.base import SamplingParams

    cfg, g, s = trainer.cfg, trainer.cfg.algo.group_size, trainer.cfg.rollout.sampling
    problems = trainer.sampler.batch(step, r)
    prompts = [encode_prompt(trainer.tokenizer, p.question, cfg.data.template) for p in problems for _ in range(g)]
    seed = cfg.train.seed + step + 100_003 * r
    rolls = trainer.engine.generate(prompts, SamplingParams(s.temperature, s.top_p, s.top_k, s.max_new_tokens, seed))
    rewards = trainer.scorer.score(
        [trainer.tokenizer.decode(x.response_ids) for x in rolls], [p.answer for p in problems for _ in range(g)]
    )
    return problems, rolls, rewards, informative_groups(torch.tensor(rewards.total), g).tolist()


def test_resample_keeps_the_first_informative_groups_and_the_step_trains_on_them(runtime):  # noqa: F811
    from r1mega.rewards import RewardScorer
    from r1mega.trainer import StepTimer

    cfg = small_config()
    cfg.algo.dynamic_sampling, cfg.algo.max_sample_rounds, cfg.algo.beta = "resample", 4, 0.0
    g, want = cfg.algo.group_size, cfg.rollout.prompts_per_step
    with RewardScorer(cfg.reward) as scorer:
        trainer = _cold_started(cfg, runtime, scorer)
        step = 0
        rounds = [_round(trainer, step, r) for r in range(cfg.algo.max_sample_rounds)]
        p0, r0, w0, ok0 = rounds[0]
        assert 0 < sum(ok0) < want, "the test needs a first round with some, not enough, informative groups"
        problems, rollouts, rewards, logged = trainer._resample(step, p0, r0, w0, StepTimer())
        again = trainer._resample(step, p0, r0, w0, StepTimer())  # the same step from the same weights
        assert [x.response_ids for x in again[1]] == [x.response_ids for x in rollouts] and again[3] == logged

        n = int(logged["rollout/sample_rounds"])
        have = [sum(ok) for *_, ok in rounds]
        assert n == next((k + 1 for k in range(len(rounds)) if sum(have[: k + 1]) >= want), len(rounds))
        pool = [(p, rolls[i * g : (i + 1) * g], ok[i]) for p_, rolls, _, ok in rounds[:n] for i, p in enumerate(p_)]
        expect = ([x for x in pool if x[2]] + [x for x in pool if not x[2]])[:want]
        assert [p.question for p in problems] == [p.question for p, *_ in expect]
        assert [x.response_ids for x in rollouts] == [x.response_ids for _, rolls, _ in expect for x in rolls]
        assert len(rewards.total) == want * g

        m = trainer.step(step)
        assert m["rollout/sample_rounds"] == n and m["train/skipped"] == 0.0
        assert m["rollout/informative_groups"] == min(want, sum(have[:n]))


def test_two_expert_parallel_ranks_agree_on_the_rounds(tmp_path):
    """2 gloo ranks, ep=2 (every generation is an all-to-all over both): a disagreement on the rounds would hang."""
    out = tmp_path / "run"
    args = [
        "parallel.ep=2", "algo.dynamic_sampling=resample", "algo.max_sample_rounds=3", "algo.beta=0",
        "sft.steps=60", "sft.batch_size=16", "sft.num_examples=128", "train.steps=2", "rollout.prompts_per_step=4",
        "algo.group_size=4", "data.num_eval=2", "train.eval_samples=1", "model.num_layers=1", "train.threads=1",
        "rollout.sampling.max_new_tokens=8", "logging.plot=false", "logging.progress=false",
        "logging.wandb_mode=disabled", f"logging.out_dir={out}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    from tests.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "r1mega.train", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rollout/sample_rounds" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 1 <= r["rollout/sample_rounds"] <= 3
        assert r["rollout/informative_groups"] == 4 or r["rollout/sample_rounds"] == 3
