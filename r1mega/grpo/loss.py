"""The GRPO objective in plain PyTorch: the reference and the CPU path.

Per token t of answer i (all tensors [B, S], response tokens selected by ``mask``):

    ratio  = exp(logp - old_logp)                 (GSPO: sg(s_i) * exp(logp - sg(logp)), s_i the
                                                   geometric-mean sequence ratio)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1   (k3, unbiased and non-negative)
    loss_t = pg + beta * kl

Aggregation is expressed as per-token weights ``u`` and a denominator, so that megatron (with
``calculate_per_token_loss``) divides the summed loss by the denominator summed over every
microbatch and data-parallel rank; that is exact for every mode:

    seq-mean-token-mean (paper)   u = 1/|o_i|      denominator = number of answers
    token-mean (DAPO)             u = 1            denominator = number of answer tokens
    seq-mean-token-sum-norm (Dr.) u = 1/max_len    denominator = number of answers

"Per answer" is per row of [B, S], or, for a packed microbatch (one row [1, T] holding several answers,
:mod:`r1mega.packing`), per ``seq_ids`` value: every function here that aggregates per answer takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSettings:
    eps_low: float
    eps_high: float
    beta: float
    loss_agg: str = "seq-mean-token-mean"
    ratio_level: str = "token"
    max_len: int = 1  # Dr.GRPO's constant normaliser (the generation budget)


def per_answer_sum(x: torch.Tensor, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's answer total of ``x``: row sums [B, 1] (broadcastable), or with ``seq_ids`` (packed) the
    total of its sequence, per token [B, S]."""
    if seq_ids is None:
        return x.sum(dim=1, keepdim=True)
    ids = seq_ids.reshape(-1)
    totals = x.new_zeros(int(ids.max()) + 1 if ids.numel() else 0).index_add(0, ids, x.reshape(-1))
    return totals[ids].view_as(x)


def _answers_with_tokens(mask: torch.Tensor, seq_ids: torch.Tensor | None) -> torch.Tensor:
    if seq_ids is None:
        return (mask.sum(dim=1) > 0).float().sum()
    return mask.new_tensor(float(seq_ids.reshape(-1)[mask.reshape(-1) > 0].unique().numel()), dtype=torch.float32)


def aggregation_weights(
    mask: torch.Tensor,
    loss_agg: str,
    max_len: int = 1,
    dtype: torch.dtype = torch.float32,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [B, S], denominator scalar) for this batch; see the module docstring."""
    mask = mask.to(dtype)
    lengths = per_answer_sum(mask, seq_ids)
    has_tokens = None
    if loss_agg != "token-mean":
        has_tokens = _answers_with_tokens(mask, seq_ids)
    if loss_agg == "seq-mean-token-mean":
        return mask / lengths.clamp(min=1), has_tokens
    if loss_agg == "token-mean":
        return mask, mask.sum()
    if loss_agg == "seq-mean-token-sum-norm":
        return mask / float(max_len), has_tokens
    raise ValueError(f"algo.loss_agg={loss_agg!r} is unknown")


def policy_ratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    ratio_level: str,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    log_ratio = logp - old_logp
    if ratio_level == "token":
        return torch.exp(log_ratio)
    # GSPO: s_i = exp(mean_t log ratio); per-token form sg(s_i) * pi / sg(pi) gives grad s_i * mean_t grad logp
    m = mask.to(log_ratio.dtype)
    seq_log_ratio = per_answer_sum(log_ratio * m, seq_ids) / per_answer_sum(m, seq_ids).clamp(min=1)
    return torch.exp(seq_log_ratio.detach() + logp - logp.detach())


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    s: LossSettings,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, S] and per-token statistics (clipped, kl, ratio), both unmasked."""
    ratio = policy_ratio(logp, old_logp, mask, s.ratio_level, seq_ids)
    clipped_ratio = ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high)
    unclipped_obj, clipped_obj = ratio * advantages, clipped_ratio * advantages
    pg = -torch.minimum(unclipped_obj, clipped_obj)
    is_clipped = clipped_obj < unclipped_obj  # the clipped branch is active: no gradient
    if ref_logp is not None and s.beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        loss = pg + s.beta * kl
    else:
        kl = torch.zeros_like(logp)
        loss = pg
    return loss, {"clipped": is_clipped, "kl": kl.detach(), "ratio": ratio.detach()}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    s: LossSettings,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted loss sum, denominator, metric sums): loss = sum / denominator after reduction.

    Metric values are sums over this batch's answer tokens plus their token count, so callers can
    reduce them across microbatches and ranks before dividing.
    """
    token_loss, stats = grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, s, seq_ids)
    u, denom = aggregation_weights(mask, s.loss_agg, s.max_len, dtype=token_loss.dtype, seq_ids=seq_ids)
    loss_sum = (token_loss * u).sum()
    return loss_sum, denom, metric_sums(mask, stats["clipped"], stats["kl"], stats["ratio"])


def metric_sums(
    mask: torch.Tensor,
    clipped: torch.Tensor,
    kl: torch.Tensor,
    ratio: torch.Tensor,
    entropy: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The GRPO metrics as sums over answer tokens, plus the token count (every loss path reports these)."""
    m = mask.to(torch.float32)
    out = {
        "tokens": m.sum(),
        "clip_frac": (clipped.float() * m).sum(),
        "kl": (kl * m).sum(),
        "ratio": (ratio * m).sum(),
    }
    if entropy is not None:
        out["entropy"] = (entropy * m).sum()
    return out
