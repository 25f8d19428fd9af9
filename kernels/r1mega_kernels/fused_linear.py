"""Chunked fused linear + log-prob/entropy (forward only): the [T, V] logits never exist whole.

Design (measured, docs/perf/kernels.md): the matmul is compute-bound (2 T H V FLOPs, ~26 ms at T=32768,
H=2048, V=151936) while the statistics are memory-bound (one read of each chunk's logits, ~1/12 of that). A
Triton matmul with an online-softmax epilogue would have to match cuBLAS on Hopper to win; chunking over T with
cuBLAS writing a bf16 chunk buffer and the fused statistics kernel reading it back costs one extra
write + read of each chunk and keeps cuBLAS speed: 0.91x the plain matmul at T=32768, H=2048, V=151936 with
1.24 GB extra (H200, 2026-11-29). ``overlap=True`` alternates two
buffers on two streams so chunk i's statistics can run beside chunk i+1's matmul.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ._dist import all_gather_stats, combine_stats
from .ops import _LOG2E, _as_rows, _interpreting, _launch_stats, _per_token, _tp_world

# One chunk buffer's size cap (with overlap=True two exist): 1.25 GB gives 4096-row chunks at V = 151936 bf16,
# where the chunked matmul ran at 0.91x the whole one on the H200 (2048 rows: 0.89x, 1664: 0.86x).
_CHUNK_BYTES = 1_250_000_000


def default_chunk(n_rows: int, vocab_local: int, elt_bytes: int) -> int:
    """Rows per chunk: as many as fit in _CHUNK_BYTES, a multiple of 128 (cuBLAS tile friendly), >= 128."""
    rows = max(128, (_CHUNK_BYTES // max(vocab_local * elt_bytes, 1)) // 128 * 128)
    return max(1, min(n_rows, rows))


@torch.no_grad()
def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk: int | None = None,
    overlap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logp, entropy) of softmax(hidden @ weight.T / temperature), fp32, shape hidden.shape[:-1].

    hidden [..., H], weight [V_local, H] (this rank's vocab shard, global ids from ``vocab_start``), targets
    global ids. Logits are made ``chunk`` rows at a time in the hidden dtype (extra memory: chunk * V_local * 2
    bytes, twice with ``overlap``); with a TP group the [T, 4] shard statistics of all chunks are combined with
    ONE all-gather at the end. Forward only (old-policy / reference log-probs need no gradient).
    """
    shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n, vocab = h2.shape[0], weight.shape[0]
    dev = hidden.device
    tgt = _per_token(targets, shape, dev)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp)
    if n == 0:
        return logp.view(shape), ent.view(shape)
    tp = _tp_world(tp_group) > 1
    partial = torch.empty(n, 4, dtype=torch.float32, device=dev) if tp else None
    scale2 = _LOG2E / float(temperature)
    out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = chunk or default_chunk(n, vocab, torch.empty((), dtype=out_dtype).element_size())
    use_streams = overlap and dev.type == "cuda" and not _interpreting() and n > chunk
    n_buf = 2 if use_streams else 1
    bufs = [torch.empty(min(chunk, n), vocab, dtype=out_dtype, device=dev) for _ in range(n_buf)]
    wt = weight.t()
    if use_streams:
        main = torch.cuda.current_stream(dev)
        streams = [torch.cuda.Stream(dev) for _ in range(n_buf)]
        for s in streams:
            s.wait_stream(main)
    for i, c0 in enumerate(range(0, n, chunk)):
        c1 = min(c0 + chunk, n)
        buf = bufs[i % n_buf][: c1 - c0]
        ctx = torch.cuda.stream(streams[i % n_buf]) if use_streams else contextlib.nullcontext()
        with ctx:
            torch.matmul(h2[c0:c1], wt, out=buf)
            rows = _as_rows(buf)
            _launch_stats(
                rows,
                tgt[c0:c1],
                scale2,
                vocab_start,
                logp[c0:c1],
                ent[c0:c1],
                None if partial is None else partial[c0:c1],
            )
    if use_streams:
        for s in streams:
            main.wait_stream(s)
    del bufs
    if tp:
        _, logp, ent = combine_stats(all_gather_stats(partial, tp_group))
    return logp.view(shape), ent.view(shape)
