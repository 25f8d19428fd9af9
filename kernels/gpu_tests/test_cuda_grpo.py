"""The CUDA cluster GRPO kernel (cuda_grpo.py / grpo_cluster.cu) against fp64 references. Needs an sm_90+ GPU:
skipped elsewhere (CI has none); run on the device with ``python3 -m pytest -q kernels/gpu_tests`` (not together
with kernels/tests, whose conftest switches Triton to its CPU interpreter for the whole process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE.parent / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _r1k_reference import make_grpo_inputs, ref_grpo, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability()[0] < 9
    or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs an sm_90+ GPU (thread-block clusters) and the compiled Triton path",
)

EPS_LOW, EPS_HIGH = 0.2, 0.28


@pytest.fixture(autouse=True)
def fresh_seed() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")


def _case(T: int, V: int, L: int, beta: float, masked: float, inplace: bool, cfg, grad_factor: float = 1.0):
    """Runs grpo_loss on [T/L, L+1, V][:, :-1] bf16 logits (the trainer's layout) through the cluster kernel and
    checks it against the fp64 reference on the same bf16 values."""
    from r1mega_kernels import cuda_grpo, grpo_loss, ops

    B = T // L
    full = (3.0 * torch.randn(B, L + 1, V) + 1.5).to(torch.bfloat16)
    z = full[:, :-1]
    y = torch.randint(0, V, (B, L))
    y.view(-1)[: min(3, T)] = torch.tensor([0, V - 1, V // 2])[: min(3, T)]  # first / last / middle column
    old, ref, adv, w = make_grpo_inputs(z, y, 0.9, masked_frac=masked)
    ref_in = ref if beta else None
    loss_r, stats_r, grad_r = ref_grpo(z, y, old, ref_in, adv, w, EPS_LOW, EPS_HIGH, beta, 0.9)

    dev = torch.device("cuda")
    zf = full.to(dev)[:, :-1]
    args = [t.to(dev) for t in (y, old, ref, adv, w)]
    args[2] = args[2] if beta else None
    with ops.grpo_cluster_config(cfg):
        if inplace:
            leaf = zf.detach().clone().requires_grad_()
            x = leaf * 1  # a non-leaf: the kernel may overwrite its storage
        else:
            leaf = x = zf.detach().requires_grad_()
        loss, stats = grpo_loss(x, *args, EPS_LOW, EPS_HIGH, beta, 0.9, inplace=inplace)
        path = dict(ops.LAST_GRPO_PATH)
        (loss * grad_factor).backward()
    assert path["path"] == "cuda-cluster", path
    assert cuda_grpo._chunk(V, cfg.cluster) * cfg.cluster >= V
    g = leaf.grad.cpu()
    scale = abs(float(loss_r)) + float(w.abs().sum())
    assert abs(float(loss) - float(loss_r)) <= 2e-6 * scale
    keep = w != 0
    torch.testing.assert_close(stats.logp.cpu().double(), stats_r[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(stats.entropy.cpu().double(), stats_r[1], rtol=0, atol=2e-5)
    assert torch.equal(stats.is_clipped.cpu(), stats_r[2])
    torch.testing.assert_close(stats.kl.cpu().double(), stats_r[3], rtol=1e-4, atol=2e-5)
    assert bool((g[~keep] == 0).all()), "masked rows must get exact-zero gradients"
    assert torch.isfinite(g).all()
    # bf16 output rounded to nearest: ~2^-9 relative per element
    assert rel_err(g, grad_r * grad_factor) < 4e-3
    return g, stats


def _cfg(*a, **k):
    from r1mega_kernels import cuda_grpo

    return cuda_grpo.ClusterConfig(*a, **k)


@pytest.mark.parametrize(
    "T,V,L,beta,masked,cluster,threads",
    [
        (256, 151936, 128, 0.04, 0.25, 2, 512),  # Qwen vocabulary, the default launch
        (512, 128256, 256, 0.04, 0.1, 2, 1024),  # Llama-3 vocabulary
        (96, 1000, 32, 0.04, 0.25, 4, 256),  # short last slice (1000 = 3 x 256 + 232)
        (64, 40, 8, 0.04, 0.25, 8, 256),  # 3 of 8 CTAs hold no columns
        (1, 151936, 1, 0.04, 0.0, 2, 1024),  # one token
        (128, 151936, 64, 0.0, 0.25, 2, 1024),  # no reference model
        (16, 4096, 8, 0.04, 1.0, 2, 1024),  # every row masked
    ],
)
def test_cluster_kernel_matches_fp64(T, V, L, beta, masked, cluster, threads) -> None:
    _case(T, V, L, beta, masked, False, _cfg(cluster, threads))


def test_cluster_kernel_in_place_equals_out_of_place() -> None:
    torch.manual_seed(1234)
    g_out, s_out = _case(256, 151936, 128, 0.04, 0.25, False, _cfg())
    torch.manual_seed(1234)
    g_in, s_in = _case(256, 151936, 128, 0.04, 0.25, True, _cfg())
    assert torch.equal(g_in, g_out) and torch.equal(s_in.logp, s_out.logp)


def test_cluster_kernel_upstream_gradient_and_no_staging() -> None:
    """A non-unit upstream gradient (the no-sync rescale kernel) and the launch without the staging buffer."""
    _case(128, 151936, 64, 0.04, 0.25, False, _cfg(), grad_factor=0.37)
    _case(128, 151936, 64, 0.04, 0.25, False, _cfg(stage=False))


def test_cluster_and_triton_agree_on_the_gpu() -> None:
    """Same inputs through the cluster kernel and the Triton two-sweep kernel (cluster off)."""
    from r1mega_kernels import grpo_loss, ops

    dev = torch.device("cuda")
    full = (3.0 * torch.randn(4, 257, 151936, device=dev)).to(torch.bfloat16)
    y = torch.randint(0, 151936, (4, 256), device=dev)
    old, ref, adv, w = (t.to(dev) for t in make_grpo_inputs(full[:, :-1].cpu(), y.cpu(), 1.0))
    out = {}
    for name, cfg in (("cluster", _cfg()), ("triton", None)):
        with ops.grpo_cluster_config(cfg):
            x = full[:, :-1].detach().requires_grad_()
            loss, stats = grpo_loss(x, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0)
            loss.backward()
            out[name] = (loss, stats, x.grad, ops.LAST_GRPO_PATH["path"])
    assert out["cluster"][3] == "cuda-cluster" and out["triton"][3] == "triton-fused"
    assert abs(float(out["cluster"][0] - out["triton"][0])) <= 1e-5 * float(w.abs().sum())
    assert rel_err(out["cluster"][2], out["triton"][2]) < 5e-3
    torch.testing.assert_close(out["cluster"][1].logp, out["triton"][1].logp, rtol=0, atol=2e-5)
