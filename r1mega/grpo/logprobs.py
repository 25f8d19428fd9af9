"""Per-token log-probs (and entropy) of the sampled tokens from vocab-parallel logits, in PyTorch.

This is the reference / CPU path; the GPU path is the fused Triton kernels in ``kernels/``.
Log-probs use megatron's ``vocab_parallel_cross_entropy`` (each TP rank holds a vocab shard; no
gather of the logits), so they carry a gradient. Entropy is a metric here, computed without grad.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


@torch.no_grad()
def vocab_parallel_entropy(scaled_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scaled_logits) over the full (TP-sharded) vocab: log Z - E_p[s]."""
    group = _tp_group()
    s = scaled_logits.float()
    m = s.max(dim=-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(s - m)
    stats = torch.stack([e.sum(-1), (e * s).sum(-1)], dim=-1)
    dist.all_reduce(stats, group=group)
    z, es = stats.unbind(-1)
    return torch.log(z) + m.squeeze(-1) - es / z


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[target] for vocab-sharded logits [..., V/tp]; optional entropy."""
    scaled = logits.float() / temperature  # a new fp32 tensor: megatron's CE works on it in place
    entropy = vocab_parallel_entropy(scaled) if with_entropy else None
    logp = -vocab_parallel_cross_entropy(scaled, targets)
    return logp, entropy
