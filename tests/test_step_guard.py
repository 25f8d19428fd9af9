"""The step guard (issue 14, fault 1: NaN was never caught). A non-finite gradient skips the optimizer step with
weights and Adam state bit-identical, is counted (train/step_skipped, train/bad_steps), and train.max_bad_steps in
a row stop the run (exit 1) with `latest` a finite checkpoint; sampling from non-finite weights names the cause
instead of torch.multinomial's message."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1mega.cadence import Cadence
from r1mega.config import TrainConfig
from tests.test_objectives import _trainer, runtime  # noqa: F401 (the module-scoped runtime fixture)
from tests.test_trainer import small_config


def _adam_state(policy) -> list[dict]:
    inner = [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]
    return [copy.deepcopy({id(p): dict(st) for p, st in opt.state.items()}) for opt in inner]


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_nan_gradient_skips_the_step_and_leaves_weights_and_adam_state_untouched(runtime):  # noqa: F811
    from r1mega.rewards import RewardScorer

    cfg = small_config()
    with RewardScorer(cfg.reward) as scorer:
        trainer = _trainer(cfg, runtime, scorer)
        policy = trainer.policy
        first = trainer.step(0)  # Adam state exists from here on
        assert first["train/step_skipped"] == 0.0 and math.isfinite(first["train/grad_norm"])
        # the router's expert bias is not a weight of the optimizer: finalize_model_grads moves it by the step's
        # expert loads (token counts, finite) before any optimizer step, as megatron does for a skipped fp16 step
        weights = {
            k: v.clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v) and "expert_bias" not in k
        }
        adam = _adam_state(policy)
        param = next(p for p in policy.model.parameters() if p.requires_grad)
        hook = param.register_hook(lambda g: torch.full_like(g, float("nan")))  # one non-finite gradient
        try:
            bad = trainer.step(1)
        finally:
            hook.remove()
        assert bad["train/step_skipped"] == 1.0 and math.isnan(bad["train/grad_norm"])
        after = policy.model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in weights.items()), "a skipped step must not move the weights"
        assert _same(_adam_state(policy), adam), "a skipped step must not touch the optimizer state"
        good = trainer.step(2)  # the next finite step trains again
        assert good["train/step_skipped"] == 0.0 and math.isfinite(good["train/loss"])
        assert any(not torch.equal(v, policy.model.state_dict()[k]) for k, v in weights.items())

        with torch.no_grad():
            param.view(-1)[0] = float("nan")  # weights that went non-finite elsewhere (e.g. an old checkpoint)
        from r1mega.rollout.base import NonFiniteError

        with pytest.raises(NonFiniteError, match=r"non-finite logits: the policy weights are non-finite \(\S+"):
            trainer.step(3)


def test_bad_steps_in_a_row_stop_with_status_1():
    cadence = Cadence(TrainConfig(steps=100, max_bad_steps=3, save_dir="/ckpt"))
    runs = [cadence.count_step(s) for s in (True, True, False, True, True)]
    assert runs == [1, 2, 0, 1, 2] and not cadence.after(4).stop  # a finite step resets the count
    assert cadence.count_step(True) == 3
    due = cadence.after(5)
    assert due.status == 1 and due.save and "train.max_bad_steps=3" in due.stop
    never = Cadence(TrainConfig(steps=100, max_bad_steps=0))
    assert [never.count_step(True) for _ in range(5)][-1] == 5 and not never.after(4).stop


def _checkpoint_is_finite(step_dir: Path) -> bool:
    """Reads a megatron torch_dist checkpoint without a process group (torch DCP -> one torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir / "model"), str(out))
    state = torch.load(out, weights_only=False)
    tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_cli_lr_1e3_reproducer_stops_after_max_bad_steps_with_a_finite_latest(tmp_path):
    """The issue's reproducer (`train.steps=6 optim.lr=1e3 rollout.sampling.top_k=1 train.save_dir=D
    train.save_every=2`, smaller) exited 0 with NaN loss from step 2 and NaN tensors in every checkpoint."""
    out, save = tmp_path / "run", tmp_path / "D"
    args = [
        "train.steps=6", "optim.lr=1e3", "rollout.sampling.top_k=1", f"train.save_dir={save}", "train.save_every=2",
        "sft.steps=0", "rollout.prompts_per_step=4", "algo.group_size=4", "data.num_eval=2", "train.eval_samples=1",
        "train.threads=1", "logging.plot=false", "logging.progress=false", "rollout.sampling.max_new_tokens=8",
        f"logging.out_dir={out}", "logging.wandb_mode=disabled",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "COLUMNS": "400"}  # rich: no wrapping
    cmd = [sys.executable, "-m", "r1mega.train", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient and were skipped (train.max_bad_steps=3)" in err, err
    assert "Traceback" not in proc.stderr and "held-out after RL" not in err  # no final evaluation
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/step_skipped" in r]
    skipped = [r["train/step_skipped"] for r in train]
    assert skipped[-3:] == [1.0, 1.0, 1.0] and 0.0 in skipped, skipped
    assert [r["train/bad_steps"] for r in train][-3:] == [1, 2, 3]
    assert all(math.isnan(r["train/loss"]) for r in train if r["train/step_skipped"])
    latest = save / (save / "latest").read_text().strip()
    assert latest.name == f"step_{len(train) - 1:06d}" and f"checkpoint {latest}" in err
    for step_dir in sorted(save.glob("step_*[0-9]")):
        assert _checkpoint_is_finite(step_dir), step_dir


def test_a_nan_gradient_on_one_data_parallel_rank_skips_the_step_on_every_rank(tmp_path):
    """With the distributed optimizer each rank updates only its shard: the ranks must agree on skipping, or the
    shards of one model would diverge (rank 0 stepping with finite grads while rank 1 skips)."""
    from tests.launch import REPO, run_ranks

    run_ranks(REPO / "tests" / "step_guard_worker.py", [str(tmp_path)], nproc=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {
            "nan_on_rank1": {"update_ok": 0.0, "moved": False},
            "finite": {"update_ok": 1.0, "moved": True},
        }, (rank, got)
