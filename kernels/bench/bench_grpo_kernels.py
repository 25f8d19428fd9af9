"""Benchmark of r1mega_kernels against eager PyTorch, torch.compile, Liger-Kernel and Transformer Engine.

One process, one GPU, bf16 logits. For each (T, V): per-token log-prob (+ entropy) forward, GRPO loss forward +
backward (gradient w.r.t. the logits through ``torch.autograd.grad``, so no method pays an AccumulateGrad copy),
and the fused linear + log-prob forward against the plain matmul of the same shapes. Correctness of every GPU
method is checked against fp32 eager first; a small launch-config sweep of our kernels runs at the main shape and
the best config is used for the table.

Run (H200, Liger carried as a wheel; see docs/perf/kernels.md):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl
    PYTHONPATH=/tmp/site:kernels python3 kernels/bench/bench_grpo_kernels.py
``--dry-run`` runs every code path on the CPU at toy sizes (TRITON_INTERPRET=1) to catch errors off the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

_DRY = "--dry-run" in sys.argv
if _DRY:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import r1mega_kernels as rk  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from r1mega_kernels import KernelConfig, ops  # noqa: E402

HBM_TBS = 4.3  # measured H200 copy ceiling (perf_anchors.md); the run re-measures it
EPS_LOW, EPS_HIGH, BETA, TAU = 0.2, 0.28, 0.04, 0.9
DEV = torch.device("cpu" if _DRY else "cuda")

try:
    from liger_kernel.ops.grpo_loss import GrpoLossFunction as LigerGrpo
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax as liger_logp
except Exception as e:  # noqa: BLE001
    LigerGrpo = liger_logp = None
    LIGER_NOTE = f"Liger not importable: {type(e).__name__}: {e}"
else:
    import importlib.metadata

    try:
        LIGER_NOTE = f"liger-kernel {importlib.metadata.version('liger_kernel')}"
    except importlib.metadata.PackageNotFoundError:
        LIGER_NOTE = "liger-kernel (version unknown)"
try:
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy as te_xent
except Exception as e:  # noqa: BLE001
    te_xent = None
    TE_NOTE = f"Transformer Engine not importable ({type(e).__name__}): TE rows skipped"
else:
    TE_NOTE = "Transformer Engine parallel_cross_entropy: CE forward only (-logp), no entropy"


# ----------------------------------------------------------------------------------------------- baselines
def eager_logprob_entropy(x: torch.Tensor, ids: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a trainer writes: fp32 upcast, log_softmax + gather, softmax-weighted entropy."""
    s = x.float() / tau
    lse = torch.logsumexp(s, -1)
    logp = s.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(s, -1) * s).sum(-1)
    return logp, ent


def eager_grpo(x, ids, old, ref, adv, w, tau):
    """Plain PyTorch GRPO loss (token clip, k3 KL) summed with weights w; returns (loss, entropy stat)."""
    s = x.float() / tau
    logp = torch.log_softmax(s, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old)
    c = torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
    pg = -torch.minimum(ratio * adv, c * adv)
    diff = ref - logp
    kl = torch.exp(diff) - diff - 1
    return (w * (pg + BETA * kl)).sum()


# ----------------------------------------------------------------------------------------------- timing
def bench(fn: Callable[[], object], rep_ms: int = 120) -> float:
    """Median ms (triton.testing.do_bench: events, L2 flushed between reps)."""
    if _DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=30, rep=rep_ms, return_mode="median"))


def peak_extra_gb(fn: Callable[[], object]) -> float:
    """Peak memory above what was allocated before the call, GB, the call's outputs dropped afterwards."""
    if _DRY:
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 1e9


def sync() -> None:
    if not _DRY:
        torch.cuda.synchronize()


def free_cache() -> None:
    if not _DRY:
        torch.cuda.empty_cache()


ROWS: list[dict] = []


def record(
    section: str,
    T: int,
    V: int,
    method: str,
    fn: Callable[[], object],
    nbytes: float | None = None,
    flops: float | None = None,
    rep_ms: int = 120,
    note: str = "",
) -> dict | None:
    try:
        fn()  # warm-up / compile
        sync()
        ms = bench(fn, rep_ms)
        mem = peak_extra_gb(fn)
    except Exception as e:  # noqa: BLE001 - one failing method must not lose the run
        print(f"  [{section}] {method}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=2)
        return None
    row = dict(section=section, T=T, V=V, method=method, ms=ms, peak_gb=mem, note=note)
    if nbytes:
        row["tbs"] = nbytes / ms / 1e9
        row["roof"] = row["tbs"] / HBM_TBS
    if flops:
        row["tflops"] = flops / ms / 1e9
    ROWS.append(row)
    extra = f" {row['tbs']:.2f} TB/s ({row['roof']:.0%})" if nbytes else ""
    extra += f" {row['tflops']:.0f} TFLOP/s" if flops else ""
    print(f"  [{section}] T={T} V={V} {method:<34} {ms:9.3f} ms{extra}  peak+{mem:.2f} GB {note}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(T: int, V: int, L: int):
    B = T // L
    g = torch.Generator(device=DEV)
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    base = (torch.randn(B, L + 1, V, device=DEV, dtype=torch.bfloat16, generator=g) * 2.0).contiguous()
    ids = torch.randint(0, V, (B, L), device=DEV, generator=g)
    with torch.no_grad():
        logp, _ = rk.logprob_entropy(base[:, :-1], ids, TAU)
    old = (logp + 0.3 * torch.randn(B, L, device=DEV, generator=g)).contiguous()
    ref = (logp + 0.3 * torch.randn(B, L, device=DEV, generator=g)).contiguous()
    adv_seq = torch.randn(B, device=DEV, generator=g)
    adv = adv_seq[:, None].expand(B, L).contiguous()
    mask = torch.ones(B, L, device=DEV, dtype=torch.int32)
    w = torch.full((B, L), 1.0 / T, device=DEV)
    return base, ids, old, ref, adv_seq, adv, mask, w


def grads_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, [x])[0]


# ----------------------------------------------------------------------------------------------- sections
def check_correctness(T: int, V: int, L: int) -> None:
    """Every GPU method against fp32 eager on the same bf16 logits; prints errors (the table is meaningless if
    these are off)."""
    base, ids, old, ref, adv_seq, adv, mask, w = make_inputs(T, V, L)
    x = base[:, :-1]
    e_logp, e_ent = eager_logprob_entropy(x, ids, TAU)
    o_logp, o_ent = rk.logprob_entropy(x, ids, TAU)
    print(
        f"  logprob_entropy vs eager fp32: max|dlogp|={(o_logp - e_logp).abs().max():.2e} "
        f"max|dent|={(o_ent - e_ent).abs().max():.2e}"
    )
    if liger_logp is not None:
        l_logp = liger_logp(base, ids, TAU)
        print(f"  liger selective log-softmax vs eager: max|dlogp|={(l_logp - e_logp).abs().max():.2e}")
    xe = x.detach().requires_grad_()
    le = eager_grpo(xe, ids, old, ref, adv, w, TAU)
    ge = grads_of(le, xe).float()
    xo = x.detach().requires_grad_()
    lo, st = rk.grpo_loss(xo, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU)
    go = grads_of(lo, xo).float()
    rel = float((go - ge).norm() / ge.norm())
    print(
        f"  grpo_loss vs eager: loss {lo.item():.6e} vs {le.item():.6e} (rel {abs((lo - le).item() / le.item()):.1e});"
        f" grad rel-L2 err {rel:.2e}; clip-frac {st.is_clipped.float().mean():.3f}; "
        f"entropy err {(st.entropy - e_ent).abs().max():.2e}"
    )
    assert rel < 1e-2 and abs((lo - le).item()) <= 1e-4 * abs(le.item()) + 1e-6, "grpo_loss disagrees with eager"
    print(f"  grpo_loss kernel: {ops.LAST_GRPO_PATH}")
    with ops.grpo_cluster_config(None):
        xs = x.detach().requires_grad_()
        ls, sts = rk.grpo_loss(xs, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU)
        gs = grads_of(ls, xs).float()
    print(
        f"  triton two-sweep vs default kernel: loss rel {abs((ls - lo).item() / lo.item()):.1e}, grad rel-L2 "
        f"{float((gs - go).norm() / go.norm()):.2e}, max|dgrad| {(gs - go).abs().max():.2e} "
        f"(max|grad| {go.abs().max():.2e}), max|dlogp| {(sts.logp - st.logp).abs().max():.2e}, "
        f"max|dent| {(sts.entropy - st.entropy).abs().max():.2e}, "
        f"clip equal {torch.equal(sts.is_clipped, st.is_clipped)}"
    )
    xi = x.detach().clone()
    xi_leaf = xi.requires_grad_()
    li, _ = rk.grpo_loss(xi_leaf, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU, inplace=True)
    gi = grads_of(li, xi_leaf).float()
    print(f"  inplace grad == out-of-place grad: {torch.equal(gi, go)}")
    # the vocab-parallel code path (stats kernel -> combine -> gradient kernel) on one GPU, as a 1-shard "group"
    saved = ops._tp_world, ops.all_gather_stats
    ops._tp_world, ops.all_gather_stats = (lambda g: 2), (lambda p, g: p[None])
    try:
        xt = x.detach().requires_grad_()
        lt, stt = rk.grpo_loss(xt, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU, tp_group="fake")
        gt = grads_of(lt, xt).float()
        t_logp, _ = rk.logprob_entropy(x, ids, TAU, tp_group="fake")
    finally:
        ops._tp_world, ops.all_gather_stats = saved
    print(
        f"  TP code path (1 shard): grad rel-L2 vs fused {float((gt - go).norm() / go.norm()):.2e}, "
        f"loss rel {abs((lt - lo).item() / lo.item()):.1e}, max|dlogp| {(t_logp - o_logp).abs().max():.2e}"
    )
    if LigerGrpo is not None:
        xl = base.detach().requires_grad_()
        ll = LigerGrpo.apply(xl, old, ref, ids, adv_seq, mask, TAU, BETA, EPS_LOW, EPS_HIGH, False)[0]
        gl = grads_of(ll, xl)[:, :-1].float()
        # Liger's "grpo" loss is a per-sequence mean over tokens then over B: equal to w = 1/T here (L const.)
        rel_l = float((gl - ge).norm() / ge.norm())
        print(f"  liger grpo vs eager: loss {ll.item():.6e}; grad rel-L2 err {rel_l:.2e}")
    hidden = torch.randn(T, 2048, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(V, 2048, device=DEV, dtype=torch.bfloat16) / 2048**0.5 * 2
    tgt = ids.reshape(-1)
    f_logp, f_ent = rk.fused_linear_logprob(hidden, weight, tgt, TAU, chunk=1000)
    m_logp, m_ent = eager_logprob_entropy(hidden @ weight.t(), tgt, TAU)
    print(
        f"  fused_linear_logprob vs matmul+eager: max|dlogp|={(f_logp - m_logp).abs().max():.2e} "
        f"max|dent|={(f_ent - m_ent).abs().max():.2e}"
    )
    sync()


def sweep(T: int, V: int, L: int) -> None:
    """Small launch-config sweep of our kernels at the main shape; keeps the fastest of each in rk.CONFIGS."""
    base, ids, old, ref, adv_seq, adv, mask, w = make_inputs(T, V, L)
    x = base[:, :-1]
    nbytes = 2 * T * V
    cands = [KernelConfig(2048, 1, 4), KernelConfig(1024, 1, 4), KernelConfig(4096, 2, 4), KernelConfig(4096, 4, 3)]
    best = None
    for cfg in cands:
        rk.CONFIGS["logprob_entropy"] = cfg
        r = record(
            "sweep-lp",
            T,
            V,
            f"lp b{cfg.block_v} w{cfg.num_warps} s{cfg.num_stages}",
            lambda: rk.logprob_entropy(x, ids, TAU),
            nbytes,
            rep_ms=60,
        )
        if r and (best is None or r["ms"] < best[0]):
            best = (r["ms"], cfg)
    if best is not None:
        rk.CONFIGS["logprob_entropy"] = best[1]
    print(f"  -> logprob_entropy config {rk.CONFIGS['logprob_entropy']}", flush=True)

    xg = x.detach().requires_grad_()

    def run_grpo():
        lo, _ = rk.grpo_loss(xg, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU)
        return grads_of(lo, xg)

    # (fused-kernel config, gradient-kernel config): two_kernel=True uses the second
    K2 = KernelConfig(0, 0, 0, two_kernel=True)

    def il(b: int, nw: int, ns: int, p: int, sub: int = 16) -> KernelConfig:
        return KernelConfig(b, nw, ns, p, True, sub=sub, interleave=True)

    def fu(b: int, nw: int, ns: int, p: int, sub: int = 16) -> KernelConfig:
        return KernelConfig(b, nw, ns, p, True, sub=sub)

    # p = 0: one program per row (no persistence); run 2 had the persistent ones (p >= 1) at 8.4-12 ms
    cands = [
        (fu(8192, 8, 3, 2), None),
        (fu(4096, 16, 1, 0), None),
        (fu(8192, 16, 1, 0), None),
        (fu(8192, 32, 1, 0), None),
        (fu(4096, 16, 1, 0, sub=0), None),
        (fu(4096, 8, 2, 0), None),
        (il(16384, 16, 2, 1), None),
        (K2, KernelConfig(4096, 16, 1, 0, False)),
        (K2, KernelConfig(8192, 16, 1, 0, False)),
        (K2, KernelConfig(2048, 4, 2, 0, False)),
    ]
    best = best_grad = None
    for cfg, gcfg in cands:
        rk.CONFIGS["grpo_fused"] = cfg
        if gcfg is not None:
            rk.CONFIGS["grpo_grad"] = gcfg
        c = gcfg or cfg
        kind = "2-kernel grad" if gcfg else ("interleaved" if cfg.interleave else "fused")
        name = (
            f"{kind} b{c.block_v} w{c.num_warps} s{c.num_stages} "
            f"p{c.progs_per_sm}{' rev' if c.reverse else ''} sub{c.sub}"
        )
        r = record("sweep-grpo", T, V, name, run_grpo, 2 * nbytes, rep_ms=60)
        if r and (best is None or r["ms"] < best[0]):
            best = (r["ms"], cfg, gcfg)
        if r and gcfg is not None and (best_grad is None or r["ms"] < best_grad[0]):
            best_grad = (r["ms"], gcfg)
    if best_grad is not None:  # the gradient kernel is also the vocab-parallel path's second pass
        rk.CONFIGS["grpo_grad"] = best_grad[1]
    if best is not None:
        rk.CONFIGS["grpo_fused"] = best[1]
    print(f"  -> grpo configs {rk.CONFIGS['grpo_fused']} / {rk.CONFIGS['grpo_grad']}", flush=True)
    sync()


_COMPILED: dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def run_shape(T: int, V: int, L: int, with_compile: bool, fused_variants: bool) -> None:
    _logprob_and_grpo(T, V, L, with_compile, ablation=fused_variants)
    free_cache()
    _fused_linear(T, V, fused_variants)
    free_cache()


def _logprob_and_grpo(T: int, V: int, L: int, with_compile: bool, ablation: bool = False) -> None:
    base, ids, old, ref, adv_seq, adv, mask, w = make_inputs(T, V, L)
    x = base[:, :-1]
    nbytes = 2 * T * V
    # ---- log-prob (+ entropy) forward
    sec = "logprob fwd"
    record(sec, T, V, "eager lp+ent (fp32 upcast)", lambda: eager_logprob_entropy(x, ids, TAU), nbytes)
    if with_compile:
        record(sec, T, V, "torch.compile lp+ent", lambda: compiled("lp", eager_logprob_entropy)(x, ids, TAU), nbytes)
    if liger_logp is not None:
        record(sec, T, V, "liger selective_log_softmax (no ent)", lambda: liger_logp(base, ids, TAU), nbytes)
    if te_xent is not None:
        xt = x.transpose(0, 1)  # TE wants [S, B, V]
        record(
            sec,
            T,
            V,
            "TE parallel_cross_entropy (no ent)",
            lambda: te_xent(xt, ids.t().contiguous(), 0.0, False, None),
            nbytes,
        )
    record(sec, T, V, "ours logprob_entropy", lambda: rk.logprob_entropy(x, ids, TAU), nbytes)
    sync()
    # ---- GRPO loss forward + backward (d logits)
    sec = "grpo fwd+bwd"
    xg = x.detach().requires_grad_()

    def eager_step(fn=eager_grpo):
        return grads_of(fn(xg, ids, old, ref, adv, w, TAU), xg)

    record(sec, T, V, "eager", eager_step, 2 * nbytes, rep_ms=200)
    if with_compile:
        record(sec, T, V, "torch.compile", lambda: eager_step(compiled("grpo", eager_grpo)), 2 * nbytes)
    if LigerGrpo is not None:
        xl = base.detach().requires_grad_()
        record(
            sec,
            T,
            V,
            "liger GrpoLossFunction",
            lambda: grads_of(
                LigerGrpo.apply(xl, old, ref, ids, adv_seq, mask, TAU, BETA, EPS_LOW, EPS_HIGH, False)[0], xl
            ),
            2 * nbytes,
        )

    def ours(inplace: bool):
        lo, _ = rk.grpo_loss(xg, ids, old, ref, adv, w, EPS_LOW, EPS_HIGH, BETA, TAU, inplace=inplace)
        return grads_of(lo, xg)

    record(sec, T, V, "ours grpo_loss", lambda: ours(False), 2 * nbytes)
    record(sec, T, V, "ours grpo_loss inplace", lambda: ours(True), 2 * nbytes, note="(logits overwritten)")
    with ops.grpo_cluster_config(None):  # the Triton two-sweep kernel: the path off Hopper / for fp32 logits
        record(sec, T, V, "ours triton two-sweep (cluster off)", lambda: ours(False), 2 * nbytes)
    if ablation:  # the other single-rank Triton implementation, for the record
        saved = rk.CONFIGS["grpo_fused"]
        if saved.two_kernel:
            rk.CONFIGS["grpo_fused"] = KernelConfig(8192, 8, 3, 2, True, sub=16)
            name = "ours fused 1-kernel (b8192 w8 s3 p2 sub16)"
        else:
            rk.CONFIGS["grpo_fused"] = KernelConfig(0, 0, 0, two_kernel=True)
            name = "ours 2-kernel (stats + grad, 3 passes)"
        try:
            with ops.grpo_cluster_config(None):
                record(sec, T, V, name, lambda: ours(False), 2 * nbytes)
        finally:
            rk.CONFIGS["grpo_fused"] = saved


def _fused_linear(T: int, V: int, fused_variants: bool) -> None:
    """Fused linear + log-prob forward at H = 2048 (the Qwen3-30B-A3B head) against the plain matmul."""
    sec = "linear+logprob fwd"
    H = 2048 if not _DRY else 64
    hidden = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device=DEV, dtype=torch.bfloat16) / H**0.5 * 2
    tgt = torch.randint(0, V, (T,), device=DEV)
    flops = 2 * T * H * V
    record(sec, T, V, "plain matmul (logits out)", lambda: hidden @ weight.t(), flops=flops)
    record(
        sec,
        T,
        V,
        "matmul + ours logprob_entropy",
        lambda: rk.logprob_entropy(hidden @ weight.t(), tgt, TAU),
        flops=flops,
    )
    variants = [(None, False)]
    if fused_variants:
        variants += [(2048, False), (2048, True)]
    for chunk, overlap in variants:
        name = f"ours fused chunk={chunk or rk.default_chunk(T, V, 2)}{' overlap' if overlap else ''}"
        record(
            sec,
            T,
            V,
            name,
            lambda c=chunk, o=overlap: rk.fused_linear_logprob(hidden, weight, tgt, TAU, chunk=c, overlap=o),
            flops=flops,
        )


def measure_copy() -> float:
    if _DRY:
        return HBM_TBS
    a = torch.empty(2 << 30, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * (2 << 30) / ms / 1e9


def summary() -> None:
    print("\n=== summary (median ms; TB/s = minimal bytes / time: 2TV for lp fwd, 4TV for grpo fwd+bwd) ===")
    hdr = f"{'section':<20}{'T':>7}{'V':>8}  {'method':<38}{'ms':>9}{'TB/s':>7}{'roof':>6}{'TFLOP/s':>9}{'peak+GB':>9}"
    print(hdr)
    for r in ROWS:
        if r["section"].startswith("sweep"):
            continue
        tbs = f"{r['tbs']:.2f}" if "tbs" in r else ""
        roof = f"{r['roof']:.0%}" if "roof" in r else ""
        tfl = f"{r['tflops']:.0f}" if "tflops" in r else ""
        print(
            f"{r['section']:<20}{r['T']:>7}{r['V']:>8}  {r['method']:<38}{r['ms']:>9.3f}{tbs:>7}{roof:>6}{tfl:>9}"
            f"{r['peak_gb']:>9.2f}"
        )
    print("\n=== ratios ===")
    keys = sorted({(r["T"], r["V"]) for r in ROWS if not r["section"].startswith("sweep")})
    for T, V in keys:

        def get(sec, meth, T=T, V=V):
            return next(
                (r["ms"] for r in ROWS if r["section"] == sec and r["T"] == T and r["V"] == V and r["method"] == meth),
                None,
            )

        lp, lpl = get("logprob fwd", "ours logprob_entropy"), get("logprob fwd", "liger selective_log_softmax (no ent)")
        g, gi = get("grpo fwd+bwd", "ours grpo_loss"), get("grpo fwd+bwd", "ours grpo_loss inplace")
        gl = get("grpo fwd+bwd", "liger GrpoLossFunction")
        mm = get("linear+logprob fwd", "plain matmul (logits out)")
        fl = [
            r
            for r in ROWS
            if r["section"] == "linear+logprob fwd"
            and r["T"] == T
            and r["V"] == V
            and r["method"].startswith("ours fused")
        ]
        best_fl = min(fl, key=lambda r: r["ms"]) if fl else None
        parts = [f"T={T} V={V}:"]
        if lp and lpl:
            parts.append(f"lp liger/ours {lpl / lp:.2f}x")
        if g and gl:
            parts.append(f"grpo liger/ours {gl / g:.2f}x (inplace {gl / gi:.2f}x)" if gi else f"grpo {gl / g:.2f}x")
        g2 = get("grpo fwd+bwd", "ours triton two-sweep (cluster off)")
        if g and g2:
            parts.append(f"grpo triton/default {g2 / g:.2f}x")
        if mm and best_fl:
            parts.append(
                f"fused-linear matmul/ours {mm / best_fl['ms']:.3f}x ({best_fl['method']}, "
                f"peak+{best_fl['peak_gb']:.2f} GB)"
            )
        print("  " + "; ".join(parts))


def main() -> None:
    global HBM_TBS
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--shapes", default="32768x151936,32768x128256,8192x151936,8192x128256")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    L = 2048
    if _DRY:
        shapes, L = [(8, 300), (4, 257)], 4
    print(
        f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; torch {torch.__version__}; "
        f"triton {triton.__version__}; device {torch.cuda.get_device_name() if not _DRY else 'cpu (dry run)'}"
    )
    print(LIGER_NOTE)
    print(TE_NOTE)
    HBM_TBS = measure_copy()
    print(f"device-to-device copy: {HBM_TBS:.2f} TB/s (read + write) -- used as the roofline", flush=True)
    t0 = time.time()
    print("--- correctness (T=4096, V=151936)")
    try:
        check_correctness(4096 if not _DRY else 8, shapes[0][1], L)
    except Exception:  # noqa: BLE001 - still measure the baselines
        traceback.print_exc()
    if not args.no_sweep:
        print("--- config sweep (main shape)")
        sweep(*shapes[0], L)
    for i, (T, V) in enumerate(shapes):
        print(f"--- T={T} V={V}  ({time.time() - t0:.0f} s)", flush=True)
        if args.skip_linear:
            _logprob_and_grpo(T, V, L, not args.no_compile, ablation=(i == 0 and not args.no_ablation))
            free_cache()
        else:
            run_shape(T, V, L, with_compile=not args.no_compile, fused_variants=(i == 0))
    summary()
    print(f"configs used: {rk.CONFIGS}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_grpo_kernels.json", "w") as f:
        json.dump(dict(rows=ROWS, copy_tbs=HBM_TBS, configs={k: vars(v) for k, v in rk.CONFIGS.items()}), f, indent=1)


if __name__ == "__main__":
    main()
