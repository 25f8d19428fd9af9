"""GRPO loss, its gradient and the advantages against plain fp64 implementations written from the formulas.

The reference below loops over answers and tokens in Python with explicit if/else for the clip, so
it shares no code (and no vectorised trick) with r1mega.grpo.
"""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.grpo.advantages import group_advantages, informative_groups
from r1mega.grpo.loss import LossSettings, grpo_loss


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, max_len=1, seq_ratio=False):
    """J as written in DeepSeekMath / DAPO / Dr.GRPO / GSPO, negated, in fp64 Python loops."""
    b, s = logp.shape
    per_seq, tokens_total, n_seq = [], 0, 0
    token_terms = []
    for i in range(b):
        idx = [t for t in range(s) if mask[i, t] > 0]
        if not idx:
            continue
        n_seq += 1
        if seq_ratio:
            mean_lr = sum(logp[i, t] - old[i, t] for t in idx) / len(idx)
            s_i = torch.exp(mean_lr)
        terms = []
        for t in idx:
            if seq_ratio:
                r = s_i.detach() * torch.exp(logp[i, t] - logp[i, t].detach())
            else:
                r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i, t]
            unclipped = r * a
            lo, hi = 1 - eps_low, 1 + eps_high
            r_c = torch.clamp(r, lo, hi)
            clipped = r_c * a
            obj = unclipped if unclipped.item() <= clipped.item() else clipped
            kl = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 if beta else 0.0
            terms.append(-obj + beta * kl)
        token_terms.extend(terms)
        tokens_total += len(idx)
        per_seq.append((sum(terms), len(idx)))
    if agg == "seq-mean-token-mean":
        return sum(tot / n for tot, n in per_seq) / n_seq
    if agg == "token-mean":
        return sum(token_terms) / tokens_total
    if agg == "seq-mean-token-sum-norm":
        return sum(tot for tot, _ in per_seq) / (max_len * n_seq)
    raise ValueError(agg)


def _inputs(seed: int, b: int = 8, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, s, generator=g, dtype=torch.float64)  # ratios well outside the clip
    ref = logp + 0.3 * torch.randn(b, s, generator=g, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0] * (b // 2), dtype=torch.float64).unsqueeze(1)  # both clip sides occur
    adv = (torch.rand(b, 1, generator=g, dtype=torch.float64) + 0.1) * signs
    adv = adv.expand(b, s).clone()
    mask = (torch.rand(b, s, generator=g) > 0.2).double()
    mask[0] = 0.0  # an answer with no tokens (fully masked row)
    mask[1, :] = 0.0
    mask[1, 2] = 1.0  # a one-token answer
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_grad_match_fp64_reference(agg, beta, eps):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    logp, old, ref, adv, mask = _inputs(seed)
    settings = LossSettings(eps[0], eps[1], beta, agg, "token", max_len=9)

    lp_ours = logp.clone().requires_grad_(True)
    loss_sum, denom, metrics = grpo_loss(lp_ours, old, ref, adv, mask, settings)
    ours = loss_sum / denom
    ours.backward()

    lp_ref = logp.clone().requires_grad_(True)
    expect = reference_loss(lp_ref, old, ref, adv, mask, eps[0], eps[1], beta, agg, max_len=9)
    expect.backward()

    assert math.isclose(ours.item(), expect.item(), rel_tol=1e-12, abs_tol=1e-12), seed
    torch.testing.assert_close(lp_ours.grad, lp_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(lp_ours.grad[mask == 0] == 0), "masked tokens must get exactly zero gradient"
    # both clip sides are exercised by these inputs and the clip fraction counts them
    r = torch.exp(logp - old)
    hi = ((adv > 0) & (r > 1 + eps[1]) & (mask > 0)).sum()
    lo = ((adv < 0) & (r < 1 - eps[0]) & (mask > 0)).sum()
    assert hi > 0 and lo > 0
    assert metrics["clip_frac"].item() == (hi + lo).item()


def test_gspo_sequence_ratio_matches_reference():
    logp, old, ref, adv, mask = _inputs(3)
    old = logp + 0.02 * torch.randn_like(logp)  # GSPO's tight clip range needs ratios near 1
    s = LossSettings(3e-4, 4e-4, 0.0, "seq-mean-token-mean", "sequence")
    lp = logp.clone().requires_grad_(True)
    loss_sum, denom, _ = grpo_loss(lp, old, None, adv, mask, s)
    (loss_sum / denom).backward()
    lp2 = logp.clone().requires_grad_(True)
    expect = reference_loss(lp2, old, ref, adv, mask, 3e-4, 4e-4, 0.0, "seq-mean-token-mean", seq_ratio=True)
    expect.backward()
    assert math.isclose((loss_sum / denom).item(), expect.item(), rel_tol=1e-12)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-10, atol=1e-12)


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    """At ratio 1 (first minibatch), no KL: d loss / d logp_t = -A_t / |o_i| / num_answers."""
    logp, _, _, adv, mask = _inputs(7)
    lp = logp.clone().requires_grad_(True)
    loss_sum, denom, _ = grpo_loss(lp, logp.clone(), None, adv, mask, LossSettings(0.2, 0.2, 0.0))
    (loss_sum / denom).backward()
    lengths = mask.sum(1, keepdim=True)
    n = (lengths > 0).sum()
    expect = torch.where(mask > 0, -adv / lengths.clamp(min=1) / n, torch.zeros_like(adv))
    torch.testing.assert_close(lp.grad, expect)


def test_k3_kl_is_nonnegative_and_zero_at_reference():
    logp = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    zero_adv = torch.zeros(4, 5, dtype=torch.float64)
    s = LossSettings(0.2, 0.2, 1.0, "token-mean")
    loss_sum, denom, m = grpo_loss(logp, logp, logp, zero_adv, mask, s)
    assert loss_sum.item() == 0.0 and m["kl"].item() == 0.0
    loss_sum, denom, m = grpo_loss(logp, logp, logp + torch.randn_like(logp), zero_adv, mask, s)
    assert m["kl"].item() > 0 and loss_sum.item() > 0


def _adv_reference(rewards, g, std_norm):
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - 1)
        std = math.sqrt(var)
        out += [(x - mean) / (std + 1e-6) if std_norm else x - mean for x in grp]
    return out


@pytest.mark.parametrize("std_norm", [True, False])
def test_group_advantages(std_norm):
    rewards = [2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0]  # group 2 all equal
    got = group_advantages(torch.tensor(rewards), 4, std_norm=std_norm)
    expect = torch.tensor(_adv_reference(rewards, 4, std_norm), dtype=torch.float32)
    torch.testing.assert_close(got, expect)
    assert torch.all(got[4:8] == 0), "a group with equal rewards carries no signal"
    assert torch.isfinite(got).all()
    assert informative_groups(torch.tensor(rewards), 4).tolist() == [True, False, True]


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 4)
