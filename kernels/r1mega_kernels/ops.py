"""Python entry points: per-token log-prob + entropy, and the GRPO loss with its gradient made in the forward.

Semantics (per token t, s = z / tau over the full vocab, vocab possibly split over a TP group):
    logp_t = s[y_t] - logsumexp(s);   entropy_t = logsumexp(s) - sum_v softmax(s)_v s_v
    ratio = exp(logp - old);  c = clamp(ratio, 1 - eps_low, 1 + eps_high)
    pg_t = -min(ratio A, c A);  kl_t = exp(ref - logp) - (ref - logp) - 1;  loss = sum_t w_t (pg_t + beta kl_t)
    is_clipped_t = (A > 0 and ratio > 1 + eps_high) or (A < 0 and ratio < 1 - eps_low)   (gradient 0 there)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton

from . import _kernels as K
from . import cuda_grpo
from ._dist import all_gather_stats, combine_stats

_LOG2E = 1.0 / math.log(2.0)


@dataclass
class KernelConfig:
    """Launch parameters of one kernel.

    progs_per_sm: grid = SMs x it (persistent kernels). reverse: the gradient sweep runs newest block first.
    sub > 0: the fused GRPO stats sweep keeps per-[sub]-tile-row statistics (no cross-warp reduction in the loop).
    two_kernel (entry "grpo_fused" only): single-rank GRPO as stats kernel + gradient kernel (3 passes over the
    logits) instead of the fused one-kernel two-sweep version.
    interleave (entry "grpo_fused" only, needs sub > 0): the fused kernel pipelines across rows (row r's gradient
    sweep and row r + grid's statistics sweep in one loop), see ``_kernels._grpo_interleaved_kernel``.
    """

    block_v: int
    num_warps: int
    num_stages: int
    progs_per_sm: int = 0
    reverse: bool = True
    sub: int = 0
    two_kernel: bool = False
    interleave: bool = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Defaults = the winners of the launch-config sweep of kernels/bench/bench_grpo_kernels.py on the H200
# (2026-11-29, T=32768, V=151936 bf16; docs/perf/kernels.md has the sweep tables). Under the interpreter a small
# block exercises the multi-block + tail paths.
CONFIGS: dict[str, KernelConfig] = {
    # 1-warp programs, one per row: many rows in flight per SM; 4.28 TB/s (100% of the measured copy ceiling)
    "logprob_entropy": KernelConfig(block_v=2048, num_warps=1, num_stages=4),
    # fused 2-sweep kernel, one 32-warp program per row (<= 2 per SM: small L2 working set), per-tile-row stats
    "grpo_fused": KernelConfig(block_v=8192, num_warps=32, num_stages=1, progs_per_sm=0, reverse=True, sub=16),
    # gradient-only pass (vocab-parallel path): Liger-like one 16-warp program per row
    "grpo_grad": KernelConfig(block_v=4096, num_warps=16, num_stages=1, progs_per_sm=0, reverse=False),
}
INTERP_CONFIGS: dict[str, KernelConfig] = {
    "logprob_entropy": KernelConfig(block_v=256, num_warps=1, num_stages=1),
    "grpo_fused": KernelConfig(block_v=256, num_warps=1, num_stages=1, sub=16),
    "grpo_grad": KernelConfig(block_v=256, num_warps=1, num_stages=1, reverse=False),
}


# Single-rank GRPO with a bf16 gradient on sm_90+: the one-read cluster kernel (cuda_grpo.py, grpo_cluster.cu),
# 2 CTAs x 512 threads per row (the fastest launch of kernels/bench/bench_grpo_cluster.py on the H200, 2026-11-29:
# docs/perf/kernels.md); None = off (the Triton kernels above instead). LAST_GRPO_PATH: which kernel the last
# grpo_loss call used, and why not the cluster kernel.
GRPO_CLUSTER: cuda_grpo.ClusterConfig | None = cuda_grpo.ClusterConfig()
LAST_GRPO_PATH: dict[str, object] = {}


@contextlib.contextmanager
def grpo_cluster_config(cfg: cuda_grpo.ClusterConfig | None) -> Iterator[None]:
    """Run the enclosed grpo_loss calls with the cluster kernel launched as ``cfg`` (None: the Triton kernels)."""
    global GRPO_CLUSTER
    saved, GRPO_CLUSTER = GRPO_CLUSTER, cfg
    try:
        yield
    finally:
        GRPO_CLUSTER = saved


def _config(name: str) -> KernelConfig:
    return INTERP_CONFIGS[name] if _interpreting() else CONFIGS[name]


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: the property query costs host time on every call)."""
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def _num_programs(cfg: KernelConfig, n_rows: int, device: torch.device) -> int:
    """Grid size: SMs x progs_per_sm (persistent), or one program per row when progs_per_sm <= 0."""
    if _interpreting() or device.type != "cuda":
        return max(1, min(n_rows, 3))  # several rows per program, to exercise the persistent loop
    if cfg.progs_per_sm <= 0:  # one program per row: the hardware overlaps many rows per SM
        return max(1, n_rows)
    sms = _sm_count(device)
    return max(1, min(n_rows, sms * cfg.progs_per_sm))


@dataclass
class _Rows:
    """A [..., V] tensor seen as T rows through (L_inner, stride_b, stride_l) without copying."""

    tensor: torch.Tensor
    n_rows: int
    vocab: int
    l_inner: int
    stride_b: int
    stride_l: int


def _as_rows(x: torch.Tensor) -> _Rows:
    if x.dim() < 2:
        raise ValueError(f"logits must be [..., V], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    vocab = x.shape[-1]
    if x.dim() == 2:
        x3 = x.unsqueeze(0)
    else:
        try:
            x3 = x.view(-1, x.shape[-2], vocab)
        except RuntimeError:  # leading dims not mergeable: one copy
            x = x.contiguous()
            x3 = x.view(-1, x.shape[-2], vocab)
    n_rows = x3.shape[0] * x3.shape[1]
    return _Rows(x, n_rows, vocab, max(x3.shape[1], 1), x3.stride(0), x3.stride(1))


def _per_token(t: torch.Tensor | float, shape: torch.Size, device: torch.device, dtype: torch.dtype | None = None):
    """Broadcast a per-token (or per-sequence, broadcastable) input to the token shape and flatten it to [T]."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=device, dtype=dtype or torch.float32)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return torch.broadcast_to(t.to(device), shape).reshape(-1).contiguous()


def _tp_world(tp_group: dist.ProcessGroup | None) -> int:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(tp_group)


def _launch_stats(
    rows: _Rows,
    targets: torch.Tensor,
    scale2: float,
    vocab_start: int,
    logp: torch.Tensor,
    ent: torch.Tensor,
    partial: torch.Tensor | None,
    lse2: torch.Tensor | None = None,
) -> None:
    """Stats kernel: logp / entropy (and lse2 if given) of a single-rank vocab, or the shard partials."""
    cfg = _config("logprob_entropy")
    finalize = partial is None
    K._logprob_entropy_kernel[(rows.n_rows,)](
        rows.tensor,
        rows.stride_b,
        rows.stride_l,
        rows.l_inner,
        targets,
        logp,
        ent,
        logp if lse2 is None else lse2,
        logp if finalize else partial,
        rows.vocab,
        vocab_start,
        scale2,
        FINALIZE=finalize,
        WRITE_LSE2=lse2 is not None,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` and entropy of softmax(logits / temperature), fp32, shape logits[:-1].

    One read of the logits (bf16/fp16/fp32, never upcast in memory), one exp per element. With a TP group of
    size > 1, ``logits`` is this rank's vocab shard starting at global id ``vocab_start`` and ``targets`` are
    global ids; the shards' statistics are combined with one all-gather of [T, 4] fp32 (see ``_dist``).
    No autograd: used for the old-policy / reference passes.
    """
    rows = _as_rows(logits)
    shape = logits.shape[:-1]
    dev = logits.device
    logp = torch.empty(rows.n_rows, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp)
    if rows.n_rows == 0:
        return logp.view(shape), ent.view(shape)
    tgt = _per_token(targets, shape, dev)
    scale2 = _LOG2E / float(temperature)
    if _tp_world(tp_group) == 1:
        _launch_stats(rows, tgt, scale2, vocab_start, logp, ent, None)
        return logp.view(shape), ent.view(shape)
    partial = torch.empty(rows.n_rows, 4, dtype=torch.float32, device=dev)
    _launch_stats(rows, tgt, scale2, vocab_start, logp, ent, partial)
    _, logp, ent = combine_stats(all_gather_stats(partial, tp_group))
    return logp.view(shape), ent.view(shape)


class GRPOStats(NamedTuple):
    """Per-token outputs of ``grpo_loss`` (shape logits.shape[:-1]); all 0 / False on rows with weight 0."""

    logp: torch.Tensor  # fp32
    entropy: torch.Tensor  # fp32
    is_clipped: torch.Tensor  # bool: the clipped branch is active (zero policy gradient)
    kl: torch.Tensor  # fp32 k3 estimator (0 when ref_logp is None)


def _launch_grpo_kernel(
    cfg, grid, rows, drows, tgt, old, ref, adv, w, lse2, logp, loss_tok, ent, clip, kl, vocab_start, scale2,
    inv_tau, eps_low, eps_high, beta, has_ref, fused, write_grad,
):  # fmt: skip
    K._grpo_kernel[grid](
        rows.tensor, rows.stride_b, rows.stride_l, drows.tensor, drows.stride_b, drows.stride_l, rows.l_inner,
        tgt, old, ref, adv, w, lse2, logp, loss_tok, logp, ent, clip, kl,
        # the kernel's "inv_tau" carries grad_scale too: the gradient is pre-multiplied, the loss is not
        rows.n_rows, rows.vocab, vocab_start, scale2, inv_tau, float(eps_low), float(eps_high), float(beta),
        HAS_REF=has_ref, FUSED_STATS=fused, WRITE_GRAD=write_grad, REVERSE=cfg.reverse, BLOCK_V=cfg.block_v,
        SUB=cfg.sub, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _try_cluster(
    rows, drows, tgt, old, ref, adv, w, loss_tok, logp, ent, clip, kl, vocab_start, scale2, inv_tau,
    eps_low, eps_high, beta, has_ref,
) -> bool:  # fmt: skip
    """Single-rank GRPO through the CUDA cluster kernel; False (and the reason in LAST_GRPO_PATH) if it does not
    apply here."""
    cfg = GRPO_CLUSTER
    if cfg is None or _interpreting():
        LAST_GRPO_PATH.update(reason="cluster kernel off" if cfg is None else "Triton interpreter")
        return False
    strides = (rows.stride_b, rows.stride_l, drows.stride_b, drows.stride_l)
    reason = cuda_grpo.unsupported_reason(rows.tensor, drows.tensor, strides, rows.vocab, cfg)
    if reason is None:
        try:
            info = cuda_grpo.launch(
                cfg, rows.tensor, strides[:2], drows.tensor, strides[2:], rows.l_inner, rows.n_rows, rows.vocab,
                tgt, old, ref, adv, w, loss_tok, logp, ent, clip, kl, vocab_start, scale2, inv_tau,
                float(eps_low), float(eps_high), float(beta), has_ref,
            )  # fmt: skip
        except (RuntimeError, OSError, AttributeError) as e:  # NVRTC / driver missing or too old: Triton instead
            reason = f"cluster kernel unavailable: {type(e).__name__}: {e}"
            cuda_grpo.disable(reason)
        else:
            LAST_GRPO_PATH.update(path="cuda-cluster", reason="", **info)
            return True
    LAST_GRPO_PATH.update(reason=reason)
    return False


def _grpo_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor | float,
    weights: torch.Tensor | float,
    eps_low: float,
    eps_high: float,
    beta: float,
    temperature: float,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    inplace: bool,
    write_grad: bool,
    grad_scale: float,
) -> tuple[torch.Tensor, GRPOStats, torch.Tensor | None]:
    rows = _as_rows(logits)
    shape = logits.shape[:-1]
    dev = logits.device
    n = rows.n_rows
    tgt = _per_token(targets, shape, dev)
    old = _per_token(old_logp, shape, dev)
    adv = _per_token(advantages, shape, dev, torch.float32)
    w = _per_token(weights, shape, dev, torch.float32)
    has_ref = ref_logp is not None and beta != 0.0
    ref = _per_token(ref_logp, shape, dev) if has_ref else old
    loss_tok = torch.empty(n, dtype=torch.float32, device=dev)
    clip = torch.empty(n, dtype=torch.int8, device=dev)
    kl = torch.empty(n, dtype=torch.float32, device=dev)
    scale2 = _LOG2E / float(temperature)
    if write_grad:
        dx = rows.tensor if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=dev)
        drows = _as_rows(dx)
        if inplace and drows.tensor.data_ptr() != logits.data_ptr():
            raise ValueError("inplace=True needs logits with a contiguous vocab dimension")
    else:
        dx, drows = None, rows
    single = _tp_world(tp_group) == 1
    inv_tau = float(grad_scale) / float(temperature)
    if single:
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        ent = torch.empty_like(logp)
    LAST_GRPO_PATH.clear()
    # single rank: the one-read CUDA cluster kernel where it applies (Hopper, bf16), else the Triton kernels
    # fmt: off
    cluster = n > 0 and single and write_grad and _try_cluster(
        rows, drows, tgt, old, ref, adv, w, loss_tok, logp, ent, clip, kl, vocab_start, scale2, inv_tau,
        eps_low, eps_high, beta, has_ref,
    )
    # fmt: on
    fused = single and not _config("grpo_fused").two_kernel
    if not cluster:
        LAST_GRPO_PATH["path"] = ("triton-fused" if fused else "triton-2kernel") if single else "vocab-parallel"
    if cluster:
        pass
    elif single:
        lse2 = logp  # unused by the fused kernel
        if not fused:  # stats pass first, then the gradient pass reads lse2 / logp
            lse2 = torch.empty_like(logp)
            _launch_stats(rows, tgt, scale2, vocab_start, logp, ent, None, lse2)
    else:
        partial = torch.empty(n, 4, dtype=torch.float32, device=dev)
        _launch_stats(rows, tgt, scale2, vocab_start, partial, partial, partial)
        lse2, logp, ent = combine_stats(all_gather_stats(partial, tp_group))
    if cluster:
        pass
    elif n > 0 and fused and _config("grpo_fused").interleave:
        cfg = _config("grpo_fused")
        K._grpo_interleaved_kernel[(_num_programs(cfg, n, dev),)](
            rows.tensor, rows.stride_b, rows.stride_l, drows.tensor, drows.stride_b, drows.stride_l, rows.l_inner,
            tgt, old, ref, adv, w, loss_tok, logp, ent, clip, kl,
            n, rows.vocab, vocab_start, scale2, float(grad_scale) / float(temperature),
            float(eps_low), float(eps_high), float(beta),
            HAS_REF=has_ref, WRITE_GRAD=write_grad, BLOCK_V=cfg.block_v, SUB=cfg.sub,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    elif n > 0:
        cfg = _config("grpo_fused" if fused else "grpo_grad")
        _launch_grpo_kernel(
            cfg, (_num_programs(cfg, n, dev),), rows, drows, tgt, old, ref, adv, w, lse2, logp, loss_tok, ent, clip,
            kl, vocab_start, scale2, inv_tau, eps_low, eps_high, beta, has_ref, fused, write_grad,
        )  # fmt: skip
    loss = loss_tok.sum()
    stats = GRPOStats(logp.view(shape), ent.view(shape), clip.view(torch.bool).view(shape), kl.view(shape))
    return loss, stats, dx


class GRPOLossFunction(torch.autograd.Function):
    """GRPO loss whose forward also writes d(loss)/d(logits) (upstream gradient assumed = grad_scale).

    The gradient is known in the forward (the loss is a sum of per-token terms of logp), so the single-rank
    training cost is one kernel: on Hopper with bf16 logits the CUDA cluster kernel (one read + one write of the
    logits, ``cuda_grpo.py``), elsewhere the Triton kernel (sweep 1 over a row for its statistics, sweep 2 re-reads
    it, newest blocks first, for the gradient). The backward only hands the buffer back, rescaled in place (no host
    sync) if the upstream gradient differs. Vocab-parallel: stats kernel, one all-gather of [T, 4], gradient kernel.
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        targets,
        old_logp,
        ref_logp,
        advantages,
        weights,
        eps_low,
        eps_high,
        beta,
        temperature,
        tp_group,
        vocab_start,
        inplace,
        grad_scale,
    ):
        write_grad = bool(ctx.needs_input_grad[0])
        loss, stats, dx = _grpo_forward(
            logits,
            targets,
            old_logp,
            ref_logp,
            advantages,
            weights,
            eps_low,
            eps_high,
            beta,
            temperature,
            tp_group,
            vocab_start,
            inplace,
            write_grad,
            grad_scale,
        )
        ctx.dx = dx
        ctx.grad_scale = float(grad_scale)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        dx = ctx.dx
        if dx is None:
            raise RuntimeError("GRPOLossFunction: backward called twice or the gradient was not computed")
        ctx.dx = None  # free the buffer with the graph; a second backward is not supported
        if grad_loss is not None:  # no host sync: the kernel itself returns at once when the factor is 1
            s = grad_loss.detach().float().reshape(1) / ctx.grad_scale
            block = 4096
            n_prog = min(triton.cdiv(dx.numel(), block), 4 if _interpreting() else 8 * _sm_count(dx.device))
            K._scale_kernel[(max(1, n_prog),)](dx, s, dx.numel(), BLOCK=block)
        return (dx,) + (None,) * 13


def grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor | float,
    weights: torch.Tensor | float,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.0,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    inplace: bool = False,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO clipped policy-gradient loss + beta * k3 KL, summed over tokens with weights w; fp32 scalar.

    logits [..., V] (this rank's vocab shard when tp_group has > 1 rank; targets are global ids); every per-token
    input has shape logits.shape[:-1] or broadcasts to it (e.g. advantages [B, 1] for logits [B, L, V]).
    ``weights`` carry the aggregation and the masks (0 for prompt / padding tokens): those rows are never read,
    get exact-zero gradient rows and zero stats.

    The gradient is written during the forward (into a new buffer, or into ``logits`` itself with
    ``inplace=True``: saves T*V*2 bytes; the logits are garbage afterwards and must not be needed by any other
    autograd node). It assumes the upstream gradient of the loss is ``grad_scale`` (1 for ``loss.backward()``;
    pass e.g. 1/num_microbatches when a pipeline schedule scales the loss before backward); any other value costs
    an in-place rescale pass (no host sync). Stats are not differentiable.
    """
    out = GRPOLossFunction.apply(
        logits,
        targets,
        old_logp,
        ref_logp,
        advantages,
        weights,
        eps_low,
        eps_high,
        beta,
        temperature,
        tp_group,
        vocab_start,
        inplace,
        grad_scale,
    )
    return out[0], GRPOStats(*out[1:])
