"""The training pass without [T, V] logits: a chunked linear + log-prob with its own backward.

``train.fused_lm_head_train=true``: the model stops before its output layer (``hidden_states_out``) and this
function makes the logits a chunk of tokens at a time, in the forward (keeping 3 floats a token: log-prob,
entropy, log-sum-exp) and again in the backward, where each chunk's logits gradient ``g * (onehot - p)`` becomes
the hidden states' and the weight's gradients at once. One more T·H·V matmul than the plain output layer (4
instead of 3); what it saves is the [T, V/tp] logits, the loss's fp32 copy of them and their gradient: at
T = 32k, V = 152k in bf16 about 10 + 20 + 10 GB.

It returns per-token log-probs (and entropy), not a loss, so every objective's PyTorch loss runs unchanged on top
(GSPO's sequence ratios, TIS, a plug-in ``algo.loss``): an objective opts in with ``loss_from_logprobs``.
Why not Liger's ``LigerFusedLinearGRPOLoss``: it folds one fixed loss into the chunk and is not vocab-parallel.

Vocab-parallel: each TP rank holds the weight's vocab shard; the softmax statistics are all-reduced per chunk;
the hidden-state gradient returned is this shard's part, summed over TP by the (sequence-parallel) region
around the output layer's input, as megatron's ColumnParallelLinear has it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# one fp32 chunk of logits (the backward holds about three): 1 GiB = 1664 rows at V = 151936
_CHUNK_BYTES = 1 << 30


def default_chunk(n_rows: int, vocab_local: int) -> int:
    rows = max(128, (_CHUNK_BYTES // max(4 * vocab_local, 1)) // 128 * 128)
    return max(1, min(n_rows, rows))


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk's logits / T, in fp32 at least (fp64 stays fp64: the reference tests)."""
    z = torch.matmul(h, w.t())
    return z.to(torch.promote_types(z.dtype, torch.float32)).div_(temperature)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> None:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)


def _own_targets(targets: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each target, clamped; whether this shard holds it)."""
    local = targets - vocab_start
    own = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), own


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, group, vocab_start, chunk):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(torch.promote_types(hidden.dtype, weight.dtype))
        stat = torch.promote_types(w.dtype, torch.float32)
        logp, ent, lse = (torch.empty(n, dtype=stat, device=hidden.device) for _ in range(3))
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            z = _scaled_logits(hidden[c0:c1], w, temperature)
            col, own = _own_targets(targets[c0:c1], vocab_start, vocab)
            m = z.max(dim=-1).values
            _all_reduce(m, dist.ReduceOp.MAX, group)
            e = torch.exp(z - m[:, None])
            zt = torch.where(own, z.gather(1, col[:, None]).squeeze(1), z.new_zeros(()))
            stats = torch.stack([e.sum(-1), (e * z).sum(-1), zt], dim=1)
            _all_reduce(stats, dist.ReduceOp.SUM, group)
            s, ez, zt = stats.unbind(1)
            lse[c0:c1] = m + s.log()
            logp[c0:c1] = zt - lse[c0:c1]
            ent[c0:c1] = lse[c0:c1] - ez / s
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.vocab_start, ctx.chunk = temperature, vocab_start, chunk
        ctx.mark_non_differentiable(lse)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w, n, vocab = weight.to(dtype), hidden.shape[0], weight.shape[0]
        gh = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(dtype, torch.float32)  # the weight gradient summed over chunks in fp32 at least
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for c0 in range(0, n, ctx.chunk):
            c1 = min(c0 + ctx.chunk, n)
            z = _scaled_logits(hidden[c0:c1], w, ctx.temperature)
            p = torch.exp(z - lse[c0:c1, None])
            gz = torch.zeros_like(z)
            if g_ent is not None:  # dH/dz = -p (log p + H)
                gz -= g_ent[c0:c1, None] * p * (z - lse[c0:c1, None] + ent[c0:c1, None])
            if g_logp is not None:  # d logp/dz = onehot - p
                gl = g_logp[c0:c1]
                gz -= gl[:, None] * p
                col, own = _own_targets(targets[c0:c1], ctx.vocab_start, vocab)
                gz.scatter_add_(1, col[:, None], torch.where(own, gl, gl.new_zeros(()))[:, None].to(gz.dtype))
            gz = gz.div_(ctx.temperature).to(dtype)
            if need_h:
                gh[c0:c1] = torch.matmul(gz, w).to(hidden.dtype)
            if need_w:
                gw += torch.matmul(gz.t(), hidden[c0:c1].to(dtype)).to(acc)
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None


def chunked_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: int = 0,
    chunk: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log-prob of ``targets``, entropy) of softmax(hidden @ weight.T / temperature), fp32 (fp64 for
    fp64 inputs), shaped as ``targets``; differentiable in ``hidden`` and ``weight``. hidden [..., H]; weight
    [V_local, H], this rank's vocab shard starting at global id ``vocab_start`` (``group``: the TP group, None
    without TP)."""
    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
    chunk = chunk or default_chunk(h2.shape[0], weight.shape[0])
    logp, ent = _LinearLogprob.apply(h2, weight, t, float(temperature), group, int(vocab_start), int(chunk))
    return logp.view(shape), ent.view(shape)


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunked_linear_logprob` over megatron's tensor-parallel group (the trainer's call)."""
    from r1mega.grpo.logprobs import vocab_shard

    group, start = vocab_shard(weight.shape[0])
    return chunked_linear_logprob(hidden, weight, targets, temperature, group, start)


def check_objective(objective: object, enabled: bool) -> None:
    """train.fused_lm_head_train needs an objective whose loss depends on the logits only through the per-token
    log-probs (and entropy): one with ``loss_from_logprobs``. Checked before the run starts."""
    if enabled and not hasattr(objective, "loss_from_logprobs"):
        from r1mega.config import ConfigError

        name = getattr(objective, "__name__", type(objective).__name__)
        raise ConfigError(
            f"train.fused_lm_head_train=true: the objective {name} has no loss_from_logprobs(mb, logp, entropy), "
            "so its loss needs the whole logits; add that method (r1mega/objectives/base.py) or set "
            "train.fused_lm_head_train=false"
        )
