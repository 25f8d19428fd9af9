"""Vocab-parallel combine of per-token softmax statistics with ONE collective.

Each rank reduces its vocab shard to four fp32 numbers per token, in base-2 units (see ``_kernels``):
``(m, d, sd, u_target)`` = (max, sum 2^(u-m), sum 2^(u-m)(u-m), target logit or 0 when the target is elsewhere).

Why an all-gather and not all-reduces: the sums are only addable after rescaling to a common max, so an
all-reduce design needs MAX(m) first and SUM(d, sd, u_target) second: two collectives, the second waiting on the
first. All-gathering the [T, 4] partials (16 bytes a token a rank: 0.5 MB at T = 32768) and combining locally is
one collective of the same latency class, exact, and deterministic (every rank combines the same numbers in the
same order, so all ranks get bit-identical stats).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_LN2 = math.log(2.0)


def all_gather_stats(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather the [T, 4] partial stats of every rank of ``group`` into [R, T, 4] (one collective)."""
    world = dist.get_world_size(group)
    out = torch.empty((world, *partial.shape), dtype=partial.dtype, device=partial.device)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.unbind(0)), partial.contiguous(), group=group)
    else:
        dist.all_gather_into_tensor(out, partial.contiguous(), group=group)
    return out


def combine_stats(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine [R, T, 4] shard stats into (lse2, logp, entropy), each fp32 [T].

    lse2 is the base-2 log-sum-exp of the scaled logits over the whole vocab (what the gradient kernel needs).
    """
    m, d, sd, ut = gathered.unbind(-1)
    big_m = m.max(dim=0).values
    delta = m - big_m
    a = torch.exp2(delta)
    d_tot = (a * d).sum(0)
    sd_tot = (a * (sd + d * delta)).sum(0)
    log2d = torch.log2(d_tot)
    lse2 = big_m + log2d
    logp = (ut.sum(0) - lse2) * _LN2
    entropy = (log2d - sd_tot / d_tot) * _LN2
    return lse2, logp, entropy
