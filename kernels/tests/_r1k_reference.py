"""fp64 references written from the formulas of issue 3 (independent of the kernels), and input generators."""

from __future__ import annotations

import torch


def ref_logprob_entropy(z: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logp_t = s[y_t] - logsumexp(s), entropy_t = logsumexp(s) - sum softmax(s) s, s = z / tau, in fp64."""
    s = z.double() / tau
    lse = torch.logsumexp(s, -1)
    logp = s.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(s, -1) * s).sum(-1)
    return logp, ent


def ref_grpo(z, y, old, ref, adv, w, eps_low, eps_high, beta, tau):
    """Loss, per-token stats and d loss / d z (fp64 autograd) of the GRPO objective."""
    z64 = z.detach().double().requires_grad_()
    s = z64 / tau
    logp = s.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(s, -1)
    _, ent = ref_logprob_entropy(z.detach(), y, tau)
    adv, w, old = adv.double(), w.double(), old.double()
    ratio = torch.exp(logp - old)
    c = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    tok = -torch.minimum(ratio * adv, c * adv)
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    if ref is not None and beta != 0.0:
        diff = ref.double() - logp
        kl = torch.exp(diff) - diff - 1
        tok = tok + beta * kl
    else:
        kl = torch.zeros_like(logp)
    loss = (w * torch.where(w != 0, tok, torch.zeros_like(tok))).sum()
    loss.backward()
    keep = w != 0
    z0 = torch.zeros_like(logp)
    stats = (
        torch.where(keep, logp, z0).detach(),
        torch.where(keep, ent, z0),
        clipped & keep,
        torch.where(keep, kl, z0).detach(),
    )
    return loss.detach(), stats, z64.grad


def make_grpo_inputs(z: torch.Tensor, y: torch.Tensor, tau: float, masked_frac: float = 0.25):
    """old / ref log-probs, advantages and weights for logits z. The ratio is drawn directly (both sides of both
    clip bounds) and kept 2e-3 away from the bounds, so fp32 vs fp64 never disagree on the branch."""
    shape = y.shape
    logp, _ = ref_logprob_entropy(z, y, tau)
    ratio = torch.exp(0.3 * torch.randn(shape, dtype=torch.float64))
    for b in (0.8, 1.28):
        near = (ratio - b).abs() < 2e-3
        ratio = torch.where(near, ratio + 4e-3, ratio)
    old = (logp - torch.log(ratio)).float()
    ref = (logp + 0.3 * torch.randn(shape, dtype=torch.float64)).float()
    adv = torch.randn(shape)
    adv[torch.rand(shape) < 0.1] = 0.0
    w = torch.rand(shape) + 0.1
    w[torch.rand(shape) < masked_frac] = 0.0
    return old, ref, adv, w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
