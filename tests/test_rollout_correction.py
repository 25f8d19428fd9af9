"""Rollout correction and alignment: TIS and the geometric-mean sequence mask against fp64 loops written from
the formulas (both clip sides active, KL on, masks, unknown rollout log-probs), the kernel's refusal, NeMo-RL's
token_mult_prob_error, and ``rollout.max_logp_gap`` stopping a real GRPO run on CPU when an engine's log-probs
are off (an engine wrapper in this test perturbs what the megatron engine returns).
"""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.grpo.loss import LossSettings, grpo_loss
from tests.test_grpo_loss import _inputs


def reference_tis_loss(logp, old, ref, adv, mask, rollout, eps_low, eps_high, beta, agg, mode, cap, seq_cap):
    """-J with rollout correction, fp64 Python loops: w_t = min(pi_old / pi_rollout, C) on the PG term; answers
    whose geometric-mean ratio (pi_old / pi_rollout) leaves [1/C_seq, C_seq] are left out (and not counted)."""
    b, s = logp.shape
    per_seq, token_terms = [], []
    for i in range(b):
        idx = [t for t in range(s) if mask[i, t] > 0]
        if not idx:
            continue
        lr = [0.0 if math.isnan(rollout[i, t].item()) else (old[i, t] - rollout[i, t]).item() for t in idx]
        if "seq_mask" in mode:
            rho = math.exp(sum(lr) / len(idx))
            if not (1.0 / seq_cap <= rho <= seq_cap):
                continue
        terms = []
        for t, log_r in zip(idx, lr):
            w = min(math.exp(log_r), cap) if "token" in mode else 1.0
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i, t]
            unclipped, clipped = r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a
            obj = unclipped if unclipped.item() <= clipped.item() else clipped
            d = ref[i, t] - logp[i, t]
            kl = torch.exp(d) - d - 1 if beta else 0.0
            terms.append(-w * obj + beta * kl)
        token_terms.extend(terms)
        per_seq.append((sum(terms), len(idx)))
    if agg == "seq-mean-token-mean":
        return sum(tot / n for tot, n in per_seq) / len(per_seq)
    return sum(token_terms) / sum(n for _, n in per_seq)  # token-mean


def _rollout_logp(old, mask, seed):
    g = torch.Generator().manual_seed(seed)
    rollout = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)  # weights both sides of C
    rollout[2] = old[2] - 1.2  # a sequence far off the trainer: rho = e^1.2 > 2, masked
    rollout[3] = old[3] + 0.05  # one close to it: kept
    rollout[4, :3] = float("nan")  # an engine that did not score some tokens
    return rollout


@pytest.mark.parametrize("mode", ["token", "seq_mask", "token+seq_mask"])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_tis_matches_fp64_reference(mode, agg):
    logp, old, ref, adv, mask = _inputs(11)
    rollout = _rollout_logp(old, mask, 5)
    s = LossSettings(0.2, 0.28, 0.04, agg, tis=mode, tis_cap=1.5, tis_seq_cap=2.0)
    lp = logp.clone().requires_grad_(True)
    loss_sum, denom, metrics = grpo_loss(lp, old, ref, adv, mask, s, rollout)
    (loss_sum / denom).backward()
    lp2 = logp.clone().requires_grad_(True)
    want = reference_tis_loss(lp2, old, ref, adv, mask, rollout, 0.2, 0.28, 0.04, agg, mode, 1.5, 2.0)
    want.backward()
    assert math.isclose((loss_sum / denom).item(), want.item(), rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-10, atol=1e-12)

    # the inputs exercise what they claim: weights capped and not, both clip sides, a masked answer
    w = torch.exp((old - rollout).nan_to_num(0.0)).clamp(max=1.5)
    assert ((w == 1.5) & (mask > 0)).any() and ((w < 1.0) & (mask > 0)).any()
    r = torch.exp(logp - old)
    assert ((adv > 0) & (r > 1.28) & (mask > 0)).any() and ((adv < 0) & (r < 0.8) & (mask > 0)).any()
    masked = float(metrics["tis_masked"])
    if "seq_mask" in mode:
        assert masked >= mask[2].sum().item() > 0 and lp.grad[2].abs().sum() == 0  # row 2 left the loss
        assert lp.grad[3].abs().sum() > 0
    else:
        assert masked == 0.0
    if "token" in mode:
        assert float(metrics["tis_weight"]) == pytest.approx(float((w * mask).sum()), rel=1e-6)


def test_tis_off_ignores_rollout_and_on_needs_it():
    logp, old, ref, adv, mask = _inputs(2)
    plain = grpo_loss(logp, old, ref, adv, mask, LossSettings(0.2, 0.2, 0.04))
    off = grpo_loss(logp, old, ref, adv, mask, LossSettings(0.2, 0.2, 0.04), old + 3.0)
    assert plain[0].item() == off[0].item() and "tis_weight" not in off[2]
    # rollout == old policy: TIS weight 1 and nothing masked, so the loss is plain GRPO's
    same = grpo_loss(logp, old, ref, adv, mask, LossSettings(0.2, 0.2, 0.04, tis="token+seq_mask"), old.clone())
    assert math.isclose(same[0].item(), plain[0].item(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo_loss(logp, old, ref, adv, mask, LossSettings(0.2, 0.2, 0.04, tis="token"))


def test_kernel_refuses_tis():
    from r1mega.objectives.grpo import GRPOKernel, GRPOSettings, choose_impl

    s = GRPOSettings(0.2, 0.2, 0.0, tis="token")
    ok, reason = GRPOKernel.supports(s)
    assert not ok and "algo.tis" in reason
    assert choose_impl(s, on_gpu=True, kernels_available=True) == "torch"


def test_alignment_stop_reason():
    from r1mega.trainer import alignment_stop_reason

    m = {"rollout/logp_diff_mean": 0.08, "rollout/logp_diff_max": 0.9, "rollout/token_mult_prob_error": 1.09}
    assert alignment_stop_reason(m, 4, None) == "" and alignment_stop_reason(m, 4, 0.1) == ""
    msg = alignment_stop_reason(m, 4, 0.05)
    assert "step 4" in msg and "0.08" in msg and "rollout.max_logp_gap=0.05" in msg and "push" in msg


class OffByEngine:
    """The megatron rollout engine with its log-probs shifted by ``delta``: a stand-in for an engine whose numerics
    disagree with the trainer's (test scaffolding around the real engine, not a mock of the thing under test)."""

    def __init__(self, inner, delta: float) -> None:
        self.inner, self.delta = inner, delta

    def generate(self, prompts, params):
        rolls = self.inner.generate(prompts, params)
        for r in rolls:
            r.logprobs = [x + self.delta for x in r.logprobs]
        return rolls

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_max_logp_gap_stops_the_run(tmp_path, monkeypatch):
    """A real r1mega.train.run on CPU: the engine's log-probs are 0.3 nats off; rollout.max_logp_gap=0.1 stops the
    run after the first step with the message, and the step log carries the alignment metrics."""
    import json

    import r1mega.rollout as rollout_pkg
    from r1mega.train import run
    from tests.test_trainer import small_config

    real_build = rollout_pkg.build_rollout_engine
    monkeypatch.setattr(rollout_pkg, "build_rollout_engine", lambda *a: OffByEngine(real_build(*a), -0.3))
    cfg = small_config()
    cfg.model.num_layers, cfg.data.num_eval, cfg.rollout.sampling.max_new_tokens = 1, 2, 8
    cfg.train.steps, cfg.train.save_dir, cfg.rollout.max_logp_gap = 3, str(tmp_path / "ckpt"), 0.1
    cfg.algo.tis = "token"
    cfg.logging.out_dir, cfg.logging.wandb_mode, cfg.logging.plot = str(tmp_path / "run"), "disabled", False
    cfg.logging.progress = False
    printed = []
    monkeypatch.setattr("rich.console.Console.print", lambda self, *a, **k: printed.append(" ".join(map(str, a))))
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/logp_diff_mean" in r]
    assert len(steps) == 1, "the run must stop after the first step"
    m = steps[0]
    assert m["rollout/logp_diff_mean"] == pytest.approx(0.3, abs=1e-3)
    assert m["rollout/token_mult_prob_error"] == pytest.approx(math.exp(0.3), abs=2e-3)
    assert 1.0 < m["train/tis_weight_mean"] <= math.exp(0.3) + 1e-3  # (EOS tokens: unknown, weight 1)
    stop = [p for p in printed if "stopping after 1 steps" in p]
    assert stop and "rollout.max_logp_gap=0.1 exceeded at step 0" in stop[0]
    assert list((tmp_path / "ckpt").iterdir()), "the stop saves a checkpoint"
