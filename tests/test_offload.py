"""train.offload_optimizer_during_rollout: training through offload / onload round trips gives bit-identical weights
to training without them, and the grad buffers' storage is really freed in between; the step log has the memory
report per phase. On the CPU megatron's ``optimizer.offload_to_cpu`` has nothing to move (its state is already in
host memory): there the round trip exercises the grad-buffer release and the call order, the GPU run the rest."""

from __future__ import annotations

import pytest
import torch

from tests.test_trainer import small_config


def _engine(cfg, rt, vocab):
    from megatron.core import tensor_parallel

    from r1mega.engine import MegatronEngine

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return MegatronEngine(cfg, rt, vocab)


def test_offload_round_trip_is_bit_exact():
    from r1mega.objectives import build_objective
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from tests.parallel_worker import make_batch

    cfg = small_config()
    cfg.algo.beta = 0.0
    rt = init_runtime(cfg.parallel, seed=3, device="cpu")
    try:
        vocab = 40
        a, b = _engine(cfg, rt, vocab), _engine(cfg, rt, vocab)
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k])), "same start"
        objective = build_objective(cfg, a.device)
        batch, noise_old, _ = make_batch(vocab)
        for step in range(3):
            for eng, offload in ((a, True), (b, False)):
                if offload:
                    eng.offload_for_rollout()
                    assert all(buf.grad_data.untyped_storage().size() == 0 for buf in eng.ddp.buffers)
                    eng.onload_for_training()
                logp, _ = eng.compute_logprobs(batch, 1.0)
                batch.old_logp = (logp + noise_old * (step > 0)) * batch.mask
                m = eng.forward_backward(batch, objective, lr=1e-3)
                assert m["update_ok"] == 1.0
        sa, sb = a.model.state_dict(), b.model.state_dict()
        changed = [k for k in sa if torch.is_tensor(sa[k]) and k.endswith("weight")]
        assert changed and all(torch.equal(sa[k], sb[k]) for k in changed)
        oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
        assert str(oa) == str(ob)
    finally:
        shutdown_runtime()


def test_memory_report_keys():
    from r1mega.memory import memory_metrics

    m = memory_metrics(torch.device("cpu"), "generation")
    assert set(m) == {"mem/generation/rss_gb"} and 0.01 < m["mem/generation/rss_gb"] < 1000
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        assert "mem/training/free_gb" in memory_metrics(torch.device("cuda"), "training")


@pytest.mark.parametrize("offload", [True])
def test_trainer_step_with_offload_logs_memory(offload):
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.rewards import RewardScorer
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.trainer import GRPOTrainer, PromptSampler

    cfg = small_config()
    cfg.model.num_layers, cfg.rollout.sampling.max_new_tokens = 1, 8
    cfg.train.offload_optimizer_during_rollout = offload
    rt = init_runtime(cfg.parallel, seed=3, device="cpu")
    try:
        tok = CharTokenizer()
        train, _ = load_problems(cfg.data)
        policy = MegatronEngine(cfg, rt, tok.vocab_size)
        engine = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 64, 64)
        with RewardScorer(cfg.reward) as scorer:
            m = GRPOTrainer(cfg, policy, engine, scorer, tok, PromptSampler(train, 4, 0, 1, 0)).step(0)
        assert {f"mem/{p}/rss_gb" for p in ("generation", "logprobs", "training")} <= set(m)
        assert m["rollout/logp_diff_max"] < 1e-4 and m["train/grad_norm"] > 0
    finally:
        shutdown_runtime()
