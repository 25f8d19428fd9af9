"""Where one profiled training step's time goes (used by tools/bench_train_step.py).

GPU side: CUDA kernel time bucketed by the operation that launched it (the launching op and its ancestors in
torch.profiler's tree: TE's and megatron's autograd Functions and their ``...Backward`` nodes name the layer part),
with the kernel's own name as the fallback. A bucket list by kernel name alone cannot tell an expert GEMM from a
dense one (TE's grouped GEMM runs cuBLAS's nvjet kernels like every other matmul). Host side: how much of the
step's wall time the GPU was busy at all (union of kernel intervals), kernel launches, host-device syncs and the
top ops by self CPU time: when the GPU idles, these say what it waits for.
"""

from __future__ import annotations

import re
from collections import defaultdict

# (bucket, regex over the launching op and its ancestors), in priority order: the first bucket any ancestor
# matches wins, so an aten::mm inside TE's _GroupedLinear counts as experts, not as a plain GEMM.
OP_BUCKETS = [
    ("attention", r"FusedAttn|DotProductAttention|flash_attn|fmha|scaled_dot_product"),
    ("experts", r"GroupedLinear|grouped_gemm|GroupedGemm|GroupedMLP"),
    ("dispatch", r"permute|chunk_sort|sort_chunks|router|topk|token_dispatch|all_to_all|_moe_"),
    ("loss", r"grpo|logprob|LinearLogprob|cross_entropy"),
    ("lm_head", r"LinearWithGradAccumulation|VocabParallel"),
    ("optimizer", r"Optimizer|adam|multi_tensor|clip_grad|l2norm"),
    ("gemm", r"_Linear|LayerNormLinear|aten::mm|aten::addmm|aten::bmm|aten::matmul|aten::linear"),
]
KERNEL_BUCKETS = [  # fallback when no ancestor names the part: the kernel's own name
    ("attention", r"flash|fmha|attn|sdpa"),
    ("dispatch", r"permute|sort|scatter|gather|index|topk|histc|router"),
    ("loss", r"grpo|_stats|logprob"),
    ("optimizer", r"multi_tensor|adam"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|matmul"),
]
BUCKET_NAMES = [b for b, _ in OP_BUCKETS] + ["other"]
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _ancestors(ev):
    while ev is not None:
        yield ev.name
        ev = ev.cpu_parent


def _bucket(ev, kernel_name: str) -> str:
    names = list(_ancestors(ev))
    for bucket, pat in OP_BUCKETS:
        if any(re.search(pat, n, re.I) for n in names):
            return bucket
    return next((b for b, pat in KERNEL_BUCKETS if re.search(pat, kernel_name, re.I)), "other")


def _busy_us(events) -> float:
    """Union of the GPU kernels' time intervals (streams overlap), in microseconds."""
    gpu = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy, end = busy + (e - s), e
        elif e > end:
            busy, end = busy + (e - end), e
    return busy


def analyse(prof, wall_s: float) -> dict:
    """Bucket times (ms), top kernels per bucket, GPU-busy fraction and the host-side counters of one step."""
    events = prof.events()
    ms: dict[str, float] = dict.fromkeys(BUCKET_NAMES, 0.0)
    kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in events:
        for k in getattr(ev, "kernels", ()):
            b = _bucket(ev, k.name)
            ms[b] += k.duration / 1e3
            kernels[b][k.name[:60]] += k.duration / 1e3
    rows = [r for r in prof.key_averages() if getattr(r.device_type, "name", "CPU") == "CPU"]
    count = {r.key: r.count for r in rows}
    sync_ms = sum(r.cpu_time_total for r in rows if r.key in SYNC_OPS) / 1e3
    top = sorted((r for r in rows if not r.key.startswith("ProfilerStep")), key=lambda r: -r.self_cpu_time_total)
    return {
        "ms": ms,
        "kernels": {b: sorted(v.items(), key=lambda kv: -kv[1])[:6] for b, v in kernels.items()},
        "busy": _busy_us(events) / 1e6 / wall_s if wall_s > 0 else float("nan"),
        "wall_ms": wall_s * 1e3,
        "launches": count.get("cudaLaunchKernel", 0) + count.get("cudaLaunchKernelExC", 0),
        "syncs": sum(count.get(k, 0) for k in SYNC_OPS) + count.get("aten::_local_scalar_dense", 0),
        "sync_ms": sync_ms,
        "top_cpu": [(r.key[:48], r.self_cpu_time_total / 1e3, r.count) for r in top[:8]],
    }


def report(a: dict, verbose: bool) -> str:
    total = sum(a["ms"].values()) or 1.0
    lines = [
        "    split (GPU kernel time by the op that launched it): "
        + "  ".join(f"{k}={v:.1f}ms ({v / total:.0%})" for k, v in a["ms"].items()),
        f"    GPU busy {a['busy']:.0%} of the step's {a['wall_ms']:.0f} ms; host: {a['launches']} kernel launches, "
        f"{a['syncs']} syncs ({a['sync_ms']:.0f} ms waiting in cuda*Synchronize)",
        "    top self-CPU ops: " + ", ".join(f"{n} {t:.0f}ms x{c}" for n, t, c in a["top_cpu"]),
    ]
    if verbose:
        for b, ks in a["kernels"].items():
            lines.append(f"    {b}: " + ", ".join(f"{n} {t:.1f}ms" for n, t in ks))
    return "\n".join(lines)
