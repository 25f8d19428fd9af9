"""Checkpoints are atomic and resume exactly: step 3 after a save/load equals step 3 of an unbroken run."""

from __future__ import annotations

import pytest
import torch

from tests.test_trainer import small_config


def _components(cfg, rt):
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.trainer import PromptSampler

    tok = CharTokenizer()
    train, _ = load_problems(cfg.data)
    torch.manual_seed(5)  # both runs start from the same initial weights
    policy = MegatronEngine(cfg, rt, tok.vocab_size)
    engine = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 64, 64)
    return tok, policy, engine, PromptSampler(train, cfg.rollout.prompts_per_step, 0, 1, 0)


def test_resume_is_exact(tmp_path):
    from r1mega.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.rewards import RewardScorer
    from r1mega.trainer import GRPOTrainer

    cfg = small_config()
    rt = init_runtime(cfg.parallel, seed=3, device="cpu")
    try:
        with RewardScorer(cfg.reward) as scorer:
            tok, policy, engine, sampler = _components(cfg, rt)
            trainer = GRPOTrainer(cfg, policy, engine, scorer, tok, sampler)
            trainer.step(0)
            trainer.step(1)
            saved = save_checkpoint(str(tmp_path), 1, policy)
            unbroken = trainer.step(2)
            w_unbroken = {k: v.clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v)}

            assert saved.name == "step_000001" and not list(tmp_path.glob("*.tmp"))
            assert latest_checkpoint(str(tmp_path)) == saved

            tok, policy2, engine2, sampler2 = _components(cfg, rt)
            assert load_checkpoint(saved, policy2) == 2
            resumed = GRPOTrainer(cfg, policy2, engine2, scorer, tok, sampler2).step(2)
            w_resumed = policy2.model.state_dict()
        for k, v in w_unbroken.items():
            torch.testing.assert_close(w_resumed[k], v, rtol=0, atol=0, msg=k)
        for k in ("reward/mean", "train/loss", "train/kl", "train/grad_norm", "train/entropy"):
            assert resumed[k] == unbroken[k], k
    finally:
        shutdown_runtime()


def test_interrupted_save_is_invisible(tmp_path):
    """A leftover step_N.tmp (a crash mid-save) is never picked up as the latest checkpoint."""
    from r1mega.checkpoint import latest_checkpoint

    (tmp_path / "step_000004.tmp").mkdir()
    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "step_000002").mkdir()
    (tmp_path / "latest").write_text("step_000002")
    assert latest_checkpoint(str(tmp_path)).name == "step_000002"


def test_keep_last_non_finite_model_and_shape_mismatch(tmp_path):
    """keep_last retention; a NaN model is not saved and `latest` stays on the last finite checkpoint; resuming
    into another model shape names the checkpoint, the tensor, both shapes and the fix (was a raw exception)."""
    from r1mega.checkpoint import (
        CheckpointMismatchError,
        latest_checkpoint,
        load_checkpoint,
        load_model,
        model_is_finite,
        save_checkpoint,
    )
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    cfg = small_config()
    cfg.train.keep_last = 2
    rt = init_runtime(cfg.parallel, seed=3, device="cpu")
    try:
        policy = MegatronEngine(cfg, rt, CharTokenizer().vocab_size)
        for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
            opt._init_optimizer_states_with_dummy_values()  # Adam state exists (as after a first step)

        for step in range(4):
            save_checkpoint(str(tmp_path), step, policy, keep_last=0 if step == 0 else None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002", "step_000003"]
        assert latest_checkpoint(str(tmp_path)).name == "step_000003"

        with torch.no_grad():
            next(policy.model.parameters())[0, 0] = float("nan")
        assert not model_is_finite(policy.model)
        assert save_checkpoint(str(tmp_path), 4, policy) is None
        assert latest_checkpoint(str(tmp_path)).name == "step_000003" and not (tmp_path / "step_000004").exists()
        assert not list(tmp_path.glob("*.tmp"))

        other = small_config()
        other.model.hidden_size = 32
        small = MegatronEngine(other, rt, CharTokenizer().vocab_size)
        with pytest.raises(CheckpointMismatchError) as e:
            load_checkpoint(tmp_path / "step_000003", small)
        msg = str(e.value)
        assert f"checkpoint {tmp_path / 'step_000003' / 'model'} was written by a model of another shape" in msg
        assert "embedding.word_embeddings.weight: saved (128, 64) vs this model's (128, 32)" in msg, msg
        assert "train.resume=false" in msg
        deeper = small_config()
        deeper.model.num_layers = 4
        layers = r"decoder\.layers\.\S+: saved \(2, .*\) vs this model's \(4, "  # layers are stacked on axis 0
        with pytest.raises(CheckpointMismatchError, match=layers):
            load_model(MegatronEngine(deeper, rt, CharTokenizer().vocab_size).model, tmp_path / "step_000003")
    finally:
        shutdown_runtime()
