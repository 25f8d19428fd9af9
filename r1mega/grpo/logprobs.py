"""Per-token log-probs (and entropy) of the sampled tokens from vocab-parallel logits, in PyTorch.

This is the reference / CPU path; the GPU path is the fused Triton kernels in ``kernels/`` (r1mega_kernels):
:func:`choose_logprob_impl` picks it for the no-grad passes (old policy, reference) the way the loss picks its
kernel (``algo.loss_impl``), and :func:`kernel_token_logprobs` / :func:`fused_token_logprobs` call it.
Log-probs use megatron's ``vocab_parallel_cross_entropy`` (each TP rank holds a vocab shard; no
gather of the logits), so they carry a gradient. Entropy is a metric here, computed without grad.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.utils import VocabUtility


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


def kernels_available() -> bool:
    """r1mega_kernels importable and able to run (Triton + a GPU, or TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("r1mega_kernels") is None:
        return False
    import r1mega_kernels

    return r1mega_kernels.available()


def choose_logprob_impl(loss_impl: str, on_gpu: bool, available: bool, fused_lm_head: bool) -> str:
    """``"torch"``, ``"kernel"`` (logprob_entropy over the logits) or ``"fused"`` (fused linear + log-prob from
    the hidden states: no [T, V] logits) for the no-grad log-prob passes. Same rule as the loss's kernel choice:
    ``algo.loss_impl=torch`` never, ``triton`` always (TRITON_INTERPRET=1 on a CPU), ``auto`` on a GPU."""
    wanted = loss_impl == "triton" or (loss_impl == "auto" and on_gpu)
    if not (wanted and available):
        return "torch"
    return "fused" if fused_lm_head else "kernel"


def vocab_shard(vocab_local: int):
    """(the TP group, or None without TP; the global id of this rank's first vocab entry): what the vocab-parallel
    kernels take (the group only when it is > 1)."""
    group = _tp_group()
    tp = dist.get_world_size(group)
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        vocab_local, parallel_state.get_tensor_model_parallel_rank(), tp
    )
    return (group if tp > 1 else None), start


def kernel_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(logp, entropy) by r1mega_kernels' logprob_entropy: one read of the vocab-parallel logits, no fp32 copy."""
    import r1mega_kernels

    group, start = vocab_shard(logits.shape[-1])
    return r1mega_kernels.logprob_entropy(logits, targets, temperature, tp_group=group, vocab_start=start)


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(logp, entropy) from hidden states [..., H] and the vocab-parallel output weight [V/tp, H]: logits only
    ever exist as a chunk (r1mega_kernels.fused_linear_logprob). Forward only; the training pass's version with a
    backward is r1mega.grpo.fused_lm_head."""
    import r1mega_kernels

    group, start = vocab_shard(weight.shape[0])
    return r1mega_kernels.fused_linear_logprob(hidden, weight, targets, temperature, tp_group=group, vocab_start=start)
