"""Memory switches reach megatron: activation recomputation (selective / full) gives the same loss, gradient
norm and update as none; optimizer CPU offload reaches megatron's OptimizerConfig (its optimizer is GPU-only)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from tests.parallel_worker import make_config

    rt = init_runtime(make_config("ws1", False, "seq-mean-token-mean").parallel, seed=1, device="cpu")
    yield rt
    shutdown_runtime()


def _step(runtime, state=None, **switches):
    """One GRPO optimizer step on the parallel worker's batch; (engine, metrics, log-probs after the step)."""
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.objectives.grpo import GRPOObjective
    from tests.parallel_worker import make_batch, make_config

    cfg = make_config("ws1", False, "seq-mean-token-mean")
    cfg.optim.weight_decay = 0.0
    for key, value in switches.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    policy = MegatronEngine(cfg, runtime, CharTokenizer().vocab_size)
    if state is not None:
        policy.model.load_state_dict(state)
    policy.initial_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in policy.model.state_dict().items()}
    policy.reset_reference()
    objective = GRPOObjective.from_config(cfg, policy.device)
    batch, noise_old, noise_ref = make_batch(policy.vocab_size)
    logp, _ = policy.compute_logprobs(batch, objective.temperature)
    batch.old_logp, batch.ref_logp = (logp + noise_old) * batch.mask, (logp + noise_ref) * batch.mask
    metrics = policy.forward_backward(batch, objective, lr=cfg.optim.lr)
    after, _ = policy.compute_logprobs(batch, objective.temperature)
    return policy, metrics, after * batch.mask


@pytest.fixture(scope="module")
def baseline(runtime):
    """The step without any switch, from the weights it starts from (every other run loads them)."""
    policy, metrics, after = _step(runtime)
    return policy.initial_state, metrics, after


@pytest.mark.parametrize(
    "switches,granularity",
    [({"train__recompute_granularity": "selective"}, "selective"),
     ({"train__recompute_granularity": "full", "train__recompute_method": "uniform",
       "train__recompute_num_layers": 1}, "full")],
)  # fmt: skip
def test_recompute_reaches_megatron_and_keeps_the_step(runtime, baseline, switches, granularity):
    state, want, want_after = baseline
    policy, got, after = _step(runtime, state, **switches)
    assert policy.model.config.recompute_granularity == granularity
    if granularity == "full":
        assert policy.model.config.recompute_method == "uniform" and policy.model.config.recompute_num_layers == 1
    else:
        assert "core_attn" in policy.model.config.recompute_modules
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-6)
    assert float((after - want_after).abs().max()) < 1e-6


def test_optimizer_cpu_offload_reaches_megatron():
    """optim.cpu_offload / offload_fraction become megatron's optimizer_cpu_offload / optimizer_offload_fraction.

    The step itself is not run here: megatron's HybridDeviceOptimizer only maps CUDA parameters to CPU copies
    (hybrid_optimizer.py: a CPU parameter is a KeyError), so offload exists on the GPU only."""
    from r1mega.engine import optimizer_config
    from tests.parallel_worker import make_config

    cfg = make_config("ws1", False, "seq-mean-token-mean")
    assert not optimizer_config(cfg, torch.float32).optimizer_cpu_offload
    cfg.optim.cpu_offload, cfg.optim.offload_fraction, cfg.train.precision = True, 0.5, "bf16"
    oc = optimizer_config(cfg, torch.bfloat16)
    assert oc.optimizer_cpu_offload and oc.optimizer_offload_fraction == 0.5 and oc.bf16
    assert oc.decoupled_weight_decay  # megatron's offload asserts AdamW mode


@pytest.mark.parametrize(
    "variant",
    [{}, {"algo__ratio_level": "sequence"}, {"algo__loss_agg": "seq-mean-token-sum-norm"},
     {"model__tie_embeddings": True}],
    ids=["grpo", "gspo", "dr_grpo", "tied"],
)  # fmt: skip
def test_fused_lm_head_train_keeps_the_step(runtime, baseline, variant):
    """train.fused_lm_head_train (no logits in the training pass, r1mega/grpo/fused_lm_head.py): the objective's
    PyTorch loss on its log-probs gives the same loss, gradient norm, entropy and update as over the logits, for
    GSPO's sequence ratios and Dr.GRPO's aggregation too, and with the LM head tied to the embedding."""
    state = baseline[0] if "model__tie_embeddings" not in variant else None
    # Adam's first step is ~lr * sign(g): where g is ~0, fp32 noise flips it. A large eps makes the update linear
    # in g, so the log-probs after the step compare the two gradients element by element.
    variant = {**variant, "optim__adam_eps": 1e-2}
    policy, want, want_after = _step(runtime, state, **variant)
    state = policy.initial_state
    _, got, after = _step(runtime, state, **variant, train__fused_lm_head_train=True)
    for key in ("loss", "grad_norm", "entropy", "kl", "clip_frac"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key  # fp32 sums of 200 tokens
    assert float((after - want_after).abs().max()) < 1e-6
