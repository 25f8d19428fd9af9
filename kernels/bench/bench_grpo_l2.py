"""GRPO fwd+bwd: the L2 re-read split-row kernel (CONFIGS["grpo_split"].split = "l2") against the default two-sweep
kernel and Liger. One process, one GPU, bf16 logits [B, L+1, V][:, :-1] as in bench_grpo_kernels.py.

    PYTHONPATH=/tmp/liger:$PWD/kernels python3 kernels/bench/bench_grpo_l2.py
(1) correctness of each l2 config vs the default kernel at T=4096 (some rows masked); (2) median ms of Liger, the
default kernel and the l2 configs at the main shape, then Liger / default / the two best l2 configs at the others.
``--dry-run``: the same code on the CPU interpreter at toy sizes.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo_kernels as B  # noqa: E402  (sets TRITON_INTERPRET for --dry-run)
import r1mega_kernels as rk  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from r1mega_kernels import KernelConfig, ops  # noqa: E402

DRY = B._DRY
L = 4 if DRY else 2048


def l2(k: int, b: int, nw: int, evict1: str = "evict_last", p: int = 0) -> KernelConfig:
    return KernelConfig(b, nw, 1, p, True, sub=16, split="l2", k_split=k, evict1=evict1)


VARIANTS = {
    "l2 K2 b8192 w32": l2(2, 8192, 32),
    "l2 K4 b8192 w32": l2(4, 8192, 32),
    "l2 K4 b4096 w16": l2(4, 4096, 16),
    "l2 K4 b8192 w32 evict-normal": l2(4, 8192, 32, ""),
    # diagnostic: the same math as two launches (the kernel boundary evicts: ~3 passes over the logits from DRAM)
    "diag K4 b8192 w32 phased": dataclasses.replace(l2(4, 8192, 32), split="l2-phased"),
}
if DRY:
    VARIANTS = {k: dataclasses.replace(v, block_v=64, num_warps=1, split="l2-phased") for k, v in VARIANTS.items()}
    VARIANTS["l2 K1 one launch"] = l2(1, 64, 1)


def run_ours(x, ids, old, ref, adv, w, cfg: KernelConfig | None):
    table = ops.INTERP_CONFIGS if DRY else rk.CONFIGS
    saved = table["grpo_split"]
    table["grpo_split"] = cfg if cfg is not None else dataclasses.replace(saved, split="")
    try:
        lo, st = rk.grpo_loss(x, ids, old, ref, adv, w, B.EPS_LOW, B.EPS_HIGH, B.BETA, B.TAU)
        return lo, st, B.grads_of(lo, x)
    finally:
        table["grpo_split"] = saved


def info() -> str:
    d = {k: (int(v.item()) if isinstance(v, torch.Tensor) else v) for k, v in ops.SPLIT_INFO.items()}
    keys = ("mode", "siblings", "chunk", "block", "occupancy", "grid", "n_regs", "n_spills", "err")
    return " ".join(f"{k}={d[k]}" for k in keys if k in d)


def correctness(V: int) -> None:
    T = 8 if DRY else 4096
    base, ids, old, ref, adv_seq, adv, mask, w = B.make_inputs(T, V, L)
    w = w.clone()
    w[0, :7] = 0.0  # masked rows: never read, exact-zero gradient
    x = base[:, :-1].detach().requires_grad_()
    lo, st, go = run_ours(x, ids, old, ref, adv, w, None)
    go = go.float()
    for name, cfg in VARIANTS.items():
        try:
            ls, sts, gs = run_ours(x, ids, old, ref, adv, w, cfg)
            B.sync()
            gs = gs.float()
            print(
                f"  {name}: loss rel {abs((ls - lo).item() / lo.item()):.1e}, grad rel-L2 "
                f"{float((gs - go).norm() / go.norm()):.2e}, max|dgrad| {(gs - go).abs().max():.2e} "
                f"(max|grad| {go.abs().max():.2e}), max|dlogp| {(sts.logp - st.logp).abs().max():.2e}, "
                f"max|dent| {(sts.entropy - st.entropy).abs().max():.2e}, clip equal "
                f"{torch.equal(sts.is_clipped, st.is_clipped)}, masked grad zero {bool((gs[0, :7] == 0).all())}; "
                f"{info()}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            VARIANTS[name] = None


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
    r = B.record("grpo", T, V, "ours default (two-sweep)", lambda: run_ours(x, ids, old, ref, adv, w, None), nbytes)
    out["default"] = r and r["ms"]
    for name, cfg in variants.items():
        if cfg is None:
            continue
        r = B.record("grpo", T, V, f"ours {name}", lambda c=cfg: run_ours(x, ids, old, ref, adv, w, c), nbytes)
        B.sync()
        print(f"      {info()}; fallbacks so far {ops.split_fallbacks(B.DEV)}", flush=True)
        out[name] = r and r["ms"]
    return out


def main() -> None:
    print(
        f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; torch {torch.__version__}; "
        f"triton {triton.__version__}; {B.LIGER_NOTE}"
    )
    if not DRY:
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name}: {p.multi_processor_count} SMs, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    B.HBM_TBS = B.measure_copy()
    print(f"copy ceiling {B.HBM_TBS:.2f} TB/s", flush=True)
    t0 = time.time()
    shapes = [(32768, 151936), (32768, 128256), (8192, 151936)] if not DRY else [(8, 300), (8, 257)]
    print("--- correctness vs the default kernel (T=4096, V=151936)", flush=True)
    correctness(shapes[0][1])
    res = {}
    print(f"--- main shape ({time.time() - t0:.0f} s)", flush=True)
    res[shapes[0]] = shape(*shapes[0], VARIANTS)
    B.free_cache()
    ranked = sorted((v, k) for k, v in res[shapes[0]].items() if k.startswith("l2") and v)
    best = {k: VARIANTS[k] for _, k in ranked[:2]}
    for T, V in shapes[1:]:
        print(f"--- T={T} V={V} ({time.time() - t0:.0f} s)", flush=True)
        res[(T, V)] = shape(T, V, best)
        B.free_cache()
    print(f"\n=== GRPO fwd+bwd, median ms (TB/s on 4TV; copy ceiling {B.HBM_TBS:.2f} TB/s) ===")
    for (T, V), r in res.items():
        lig = r.get("liger")
        for k, ms in r.items():
            if ms:
                extra = f"  liger/this {lig / ms:.2f}x" if lig else ""
                print(f"{T:>6} {V:>7}  {k:<32} {ms:8.3f} ms {4 * T * V / ms / 1e9:5.2f} TB/s{extra}")
    print(f"split fallbacks (wait timeouts) in the run: {ops.split_fallbacks(B.DEV)}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
