"""The GRPO objective in plain PyTorch: the reference and the CPU path.

Per token t of answer i (all tensors [B, S], response tokens selected by ``mask``):

    ratio  = exp(logp - old_logp)                 (GSPO: sg(s_i) * exp(logp - sg(logp)), s_i the
                                                   geometric-mean sequence ratio)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1   (k3, unbiased and non-negative)
    loss_t = pg + beta * kl

Rollout correction (``tis``; the rollout engine's log-probs ``rollout_logp`` against the recomputed old policy):

    token           pg_t <- w_t * pg_t,  w_t = sg(min(exp(old_logp - rollout_logp), C))   (TIS, C = tis_cap)
    seq_mask        answer i leaves the loss (its tokens leave ``mask``, so the denominators too) when its
                    geometric-mean ratio  rho_i = exp(mean_t (old_logp - rollout_logp))  is outside
                    [1 / C_seq, C_seq]  (C_seq = tis_seq_cap): verl's ``rollout_rs="geometric"`` rejection
                    (verl docs/algo/rollout_corr_math.md, "geometric-level RS"), slime's MIS mask likewise
    token+seq_mask  both
    Tokens whose rollout log-prob is unknown (NaN: an EOS the engine did not score) count as ratio 1.

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

import math
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
    tis: str = "none"  # rollout correction: none | token | seq_mask | token+seq_mask (module docstring)
    tis_cap: float = 2.0  # C of the token weight min(pi_old / pi_rollout, C)
    tis_seq_cap: float = 2.0  # C_seq: answers whose geometric-mean ratio leaves [1/C_seq, C_seq] are masked


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


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    mask: torch.Tensor,
    s: LossSettings,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(token weight w [B, S] or None, the loss mask with rejected answers removed); both without gradient.
    ``seq_ids`` (packed rows): the sequence mask is per answer, not per row."""
    if s.tis == "none":
        return None, mask
    if rollout_logp is None:
        raise ValueError(f"algo.tis={s.tis!r} needs the rollout engine's log-probs (batch.rollout_logp)")
    log_ratio = (old_logp.detach() - rollout_logp).nan_to_num(0.0)  # unknown rollout log-prob: ratio 1
    weight = torch.exp(log_ratio).clamp(max=s.tis_cap) if "token" in s.tis else None
    if "seq_mask" in s.tis:
        m = mask.to(log_ratio.dtype)
        seq_log_ratio = per_answer_sum(log_ratio * m, seq_ids) / per_answer_sum(m, seq_ids).clamp(min=1)
        bound = math.log(s.tis_seq_cap)
        mask = mask * (seq_log_ratio.abs() <= bound).to(mask.dtype)
    return weight, mask


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    s: LossSettings,
    tis_weight: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, S] and per-token statistics (clipped, kl, ratio), both unmasked."""
    ratio = policy_ratio(logp, old_logp, mask, s.ratio_level, seq_ids)
    clipped_ratio = ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high)
    unclipped_obj, clipped_obj = ratio * advantages, clipped_ratio * advantages
    pg = -torch.minimum(unclipped_obj, clipped_obj)
    if tis_weight is not None:
        pg = tis_weight * pg
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
    rollout_logp: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted loss sum, denominator, metric sums): loss = sum / denominator after reduction.

    Metric values are sums over this batch's answer tokens plus their token count, so callers can
    reduce them across microbatches and ranks before dividing. ``rollout_logp`` is only read with ``s.tis``.
    """
    weight, loss_mask = rollout_correction(old_logp, rollout_logp, mask, s, seq_ids)
    token_loss, stats = grpo_token_loss(logp, old_logp, ref_logp, advantages, loss_mask, s, weight, seq_ids)
    u, denom = aggregation_weights(loss_mask, s.loss_agg, s.max_len, dtype=token_loss.dtype, seq_ids=seq_ids)
    loss_sum = (token_loss * u).sum()
    out = metric_sums(mask, stats["clipped"], stats["kl"], stats["ratio"])
    if s.tis != "none":
        out.update(tis_metric_sums(mask, loss_mask, weight))
    return loss_sum, denom, out


def tis_metric_sums(
    mask: torch.Tensor, loss_mask: torch.Tensor, weight: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Sums over answer tokens: the TIS weight (1 where none applies) and the tokens the sequence mask rejected."""
    m = mask.to(torch.float32)
    w = torch.ones_like(m) if weight is None else weight.float()
    return {"tis_weight": (w * m).sum(), "tis_masked": (m - loss_mask.to(torch.float32) * m).sum()}


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
