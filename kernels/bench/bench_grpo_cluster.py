"""GRPO fwd+bwd: the one-read CUDA cluster kernel (``cuda_grpo.py``) against our Triton kernel and Liger-Kernel.

One process, one GPU (sm_90+), bf16 logits ``[B, L+1, V][:, :-1]`` as in bench_grpo_kernels.py:

    PYTHONPATH=/tmp/liger:$PWD/kernels python3 kernels/bench/bench_grpo_cluster.py

(1) correctness of every cluster config against an fp64 PyTorch reference on the same bf16 logits (T=4096, masked
rows, clip on both sides, k3 KL) and against our Triton kernel, plus edge cases (empty CTAs, a short last slice,
T=1, all rows masked, in place, no reference model); (2) median ms of Liger, our Triton kernel and each cluster
config at the main shape, then the best configs at the other shapes, with ratios and the 4TV roofline.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo_kernels as B  # noqa: E402
import r1mega_kernels as rk  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from r1mega_kernels import cuda_grpo, ops  # noqa: E402

L = 2048
CC = cuda_grpo.ClusterConfig
VARIANTS: dict[str, cuda_grpo.ClusterConfig | None] = {
    "C2 t512": CC(2, 512),  # the default
    "C2 t1024": CC(2, 1024),
    "C2 t512 no staging": CC(2, 512, stage=False),
    "C4 t256 2/SM": CC(4, 256, min_blocks=2),
}


def run(x, ids, old, ref, adv, w, cfg, inplace: bool = False, beta: float = B.BETA):
    """grpo_loss with the cluster kernel configured as cfg (None: our Triton kernel); (loss, stats, grad)."""
    with ops.grpo_cluster_config(cfg):
        lo, st = rk.grpo_loss(x, ids, old, ref, adv, w, B.EPS_LOW, B.EPS_HIGH, beta, B.TAU, inplace=inplace)
        g = B.grads_of(lo, x)
    path = dict(ops.LAST_GRPO_PATH)
    if (cfg is not None) != (path.get("path") == "cuda-cluster"):
        raise RuntimeError(f"unexpected kernel path {path}")
    return lo, st, g


def reference64(x, ids, old, ref, adv, w, beta: float = B.BETA):
    """fp64 PyTorch GRPO on the same bf16 logits: loss, logp, entropy, clip mask, kl, d(loss)/d(logits)."""
    xd = x.detach().double().requires_grad_()
    s = xd / B.TAU
    lsm = torch.log_softmax(s, -1)
    logp = lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ratio = torch.exp(logp - old.double())
    a = adv.double()
    c = torch.clamp(ratio, 1 - B.EPS_LOW, 1 + B.EPS_HIGH)
    pg = -torch.minimum(ratio * a, c * a)
    diff = ref.double() - logp
    kl = torch.exp(diff) - diff - 1
    loss = (w.double() * (pg + beta * kl)).sum()
    (g,) = torch.autograd.grad(loss, [xd])
    clipped = ((a > 0) & (ratio > 1 + B.EPS_HIGH)) | ((a < 0) & (ratio < 1 - B.EPS_LOW))
    return loss.detach(), logp.detach(), ent.detach(), clipped, kl.detach(), g


def compare(name: str, got, ref, w: torch.Tensor) -> bool:
    lo, st, g = got
    rl, rlogp, rent, rclip, rkl, rg = ref
    keep = w != 0
    g = g.double()
    loss_rel = abs(lo.double().item() - rl.item()) / max(abs(rl.item()), 1e-30)
    grad_rel = float((g - rg).norm() / rg.norm().clamp_min(1e-30))
    dlogp = float((st.logp.double() - rlogp).abs()[keep].max()) if keep.any() else 0.0
    dent = float((st.entropy.double() - rent).abs()[keep].max()) if keep.any() else 0.0
    # the clip decision flips only where the ratio sits within float rounding of 1 +- eps
    clip_diff = int((st.is_clipped != (rclip & keep)).sum())
    masked_zero = bool((g[~keep] == 0).all()) and bool((st.logp[~keep] == 0).all())
    ok = loss_rel < 1e-4 and grad_rel < 5e-3 and dlogp < 1e-4 and dent < 1e-4 and clip_diff <= 2 and masked_zero
    print(
        f"  {'ok ' if ok else 'BAD'} {name:<34} loss rel {loss_rel:.1e}  grad rel-L2 {grad_rel:.1e}  "
        f"max|dlogp| {dlogp:.1e}  max|dent| {dent:.1e}  clip diff {clip_diff}  masked exact 0 {masked_zero}",
        flush=True,
    )
    return ok


def inputs(T: int, V: int, Lr: int, masked: int = 7):
    base, ids, old, ref, adv_seq, adv, mask, w = B.make_inputs(T, V, Lr)
    w = w.clone()
    w.view(-1)[:masked] = 0.0
    return base, ids, old, ref, adv_seq, adv, mask, w


def correctness() -> bool:
    ok = True
    print("--- correctness vs fp64 PyTorch on the same bf16 logits", flush=True)
    base, ids, old, ref, _, adv, _, w = inputs(4096, 151936, L)
    x = base[:, :-1].detach().requires_grad_()
    r64 = reference64(x, ids, old, ref, adv, w)
    ok &= compare("triton (ours, two-sweep)", run(x, ids, old, ref, adv, w, None), r64, w)
    for name, cfg in VARIANTS.items():
        try:
            ok &= compare(f"cluster {name}", run(x, ids, old, ref, adv, w, cfg), r64, w)
        except Exception as e:  # noqa: BLE001 - report and drop the config, keep the run
            print(f"  BAD cluster {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            VARIANTS[name] = None
            ok = False
    print(f"  launch: {ops.LAST_GRPO_PATH}", flush=True)
    del r64, x, base
    cfg = ops.GRPO_CLUSTER
    # edge cases, default config: (T, V, L, masked rows, beta, inplace)
    cases = [
        ("V=40: 3 of 8 CTAs empty (C8)", 64, 40, 8, 3, B.BETA, False, CC(8, 256)),
        ("V=1000: short last slice", 96, 1000, 32, 5, B.BETA, False, cfg),
        ("V=128256", 512, 128256, 256, 9, B.BETA, False, cfg),
        ("T=1", 1, 151936, 1, 0, B.BETA, False, cfg),
        ("all rows masked", 16, 4096, 8, 16, B.BETA, False, cfg),
        ("no reference model (beta=0)", 256, 151936, 128, 3, 0.0, False, cfg),
        ("in place", 256, 151936, 128, 3, B.BETA, True, cfg),
    ]
    for name, T, V, Lr, masked, beta, inplace, c in cases:
        base, ids, old, ref, _, adv, _, w = inputs(T, V, Lr, masked)
        x = base[:, :-1].detach()
        r64 = reference64(x, ids, old, ref, adv, w, beta)
        xin = x.clone() if inplace else x
        xin.requires_grad_(not inplace)
        try:
            if inplace:
                with ops.grpo_cluster_config(c):
                    with torch.no_grad():
                        leaf = xin.clone().requires_grad_()
                    h = leaf * 1  # a non-leaf whose storage the kernel may overwrite
                    lo, st = rk.grpo_loss(h, ids, old, ref, adv, w, B.EPS_LOW, B.EPS_HIGH, beta, B.TAU, inplace=True)
                    g = B.grads_of(lo, leaf)
                    assert ops.LAST_GRPO_PATH.get("path") == "cuda-cluster", ops.LAST_GRPO_PATH
                got = (lo, st, g)
            else:
                got = run(xin, ids, old, ref if beta else None, adv, w, c, beta=beta)
            ok &= compare(name, got, r64, w)
        except Exception as e:  # noqa: BLE001
            print(f"  BAD {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            ok = False
    return ok


def shape(T: int, V: int, variants: dict) -> dict:
    base, ids, old, ref, adv_seq, adv, mask, w = B.make_inputs(T, V, L)
    x = base[:, :-1].detach().requires_grad_()
    nbytes = 4 * T * V
    out = {}
    if B.LigerGrpo is not None:
        xl = base.detach().requires_grad_()
        r = B.record(
            "grpo", T, V, "liger GrpoLossFunction",
            lambda: B.grads_of(
                B.LigerGrpo.apply(xl, old, ref, ids, adv_seq, mask, B.TAU, B.BETA, B.EPS_LOW, B.EPS_HIGH, False)[0], xl
            ),
            nbytes,
        )  # fmt: skip
        out["liger"] = r and r["ms"]
    r = B.record("grpo", T, V, "ours triton two-sweep", lambda: run(x, ids, old, ref, adv, w, None), nbytes)
    out["triton"] = r and r["ms"]
    for name, cfg in variants.items():
        if cfg is None:
            continue
        r = B.record("grpo", T, V, f"ours cluster {name}", lambda c=cfg: run(x, ids, old, ref, adv, w, c), nbytes)
        keys = ("grid", "max_active_clusters", "occupancy", "n_regs", "stage_vec", "chunk")
        info = {k: ops.LAST_GRPO_PATH.get(k) for k in keys}
        print(f"      {info}", flush=True)
        out[f"cluster {name}"] = r and r["ms"]
    return out


def diagnose(T: int, V: int) -> None:
    """Time the kernel with parts left out (cuda_grpo.DIAG; the results are wrong): where the time goes."""
    base, ids, old, ref, _, adv, _, w = B.make_inputs(T, V, L)
    x = base[:, :-1].detach().requires_grad_()
    names = {0: "full kernel", 1: "no gradient stores", 2: "no loads", 4: "no exchange", 3: "no loads, no stores",
             5: "no stores, no exchange", 7: "compute only"}  # fmt: skip
    print(f"=== ablations at T={T} V={V} (ms, median) ===", flush=True)
    for cfg_name in ("C2 t512", "C2 t512 no staging"):
        cfg = VARIANTS[cfg_name]
        for diag, what in names.items():
            cuda_grpo.DIAG = diag
            try:
                ms = B.bench(lambda c=cfg: run(x, ids, old, ref, adv, w, c))
            finally:
                cuda_grpo.DIAG = 0
            print(f"  {cfg_name:<14} {what:<24} {ms:7.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="32768x151936,32768x128256,8192x151936,8192x128256")
    ap.add_argument("--diag", action="store_true", help="only the ablation timings at the first shape")
    args = ap.parse_args()
    if args.diag:
        T, V = (int(v) for v in args.shapes.split(",")[0].split("x"))
        diagnose(T, V)
        return
    print(
        f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; torch {torch.__version__}; "
        f"triton {triton.__version__}; {B.LIGER_NOTE}"
    )
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    B.HBM_TBS = B.measure_copy()
    print(f"copy ceiling {B.HBM_TBS:.2f} TB/s", flush=True)
    t0 = time.time()
    ok = correctness()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    res = {}
    print(f"--- main shape ({time.time() - t0:.0f} s)", flush=True)
    res[shapes[0]] = shape(*shapes[0], VARIANTS)
    B.free_cache()
    ranked = sorted((v, k) for k, v in res[shapes[0]].items() if k.startswith("cluster") and v)
    best = {k[len("cluster ") :]: VARIANTS[k[len("cluster ") :]] for _, k in ranked[:2]}
    for T, V in shapes[1:]:
        print(f"--- T={T} V={V} ({time.time() - t0:.0f} s)", flush=True)
        res[(T, V)] = shape(T, V, best)
        B.free_cache()
    print(f"\n=== GRPO fwd+bwd, median ms (TB/s on 4TV; copy ceiling {B.HBM_TBS:.2f} TB/s) ===")
    for (T, V), r in res.items():
        lig = r.get("liger")
        roof = 4 * T * V / B.HBM_TBS / 1e9
        for k, ms in r.items():
            if ms:
                extra = f"  liger/this {lig / ms:.2f}x" if lig else ""
                print(
                    f"{T:>6} {V:>7}  {k:<28} {ms:8.3f} ms {4 * T * V / ms / 1e9:5.2f} TB/s  "
                    f"{roof / ms:4.0%} of 4TV roof  {ms / roof:4.2f}x roof{extra}"
                )
    print(f"correctness: {'ALL OK' if ok else 'FAILURES above'}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
