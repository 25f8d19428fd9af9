"""Correctness of r1mega_kernels against fp64 references, on the CPU through TRITON_INTERPRET=1 (see conftest)."""

from __future__ import annotations

import math

import pytest
import r1mega_kernels as rk
import torch
from _r1k_reference import make_grpo_inputs, ref_grpo, ref_logprob_entropy, rel_err
from r1mega_kernels import KernelConfig, ops

EPS_LOW, EPS_HIGH = 0.2, 0.28

# single-rank Triton GRPO implementations (CONFIGS["grpo_fused"]): the fused two-sweep kernel with per-tile-row
# stats (default), the same pipelined across rows, the same with block reductions, stats + gradient as two kernels.
# (On Hopper with bf16 the CUDA cluster kernel runs instead; its checks run on the GPU: tests/test_cuda_grpo.py.)
GRPO_VARIANTS = {
    "default": ops.INTERP_CONFIGS["grpo_fused"],
    "interleaved": KernelConfig(block_v=256, num_warps=1, num_stages=1, sub=16, interleave=True),
    "fused-block": KernelConfig(block_v=256, num_warps=1, num_stages=1, sub=0, reverse=False),
    "two-kernel": KernelConfig(block_v=256, num_warps=1, num_stages=1, two_kernel=True),
}


@pytest.fixture(params=list(GRPO_VARIANTS))
def grpo_variant(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(ops.INTERP_CONFIGS, "grpo_fused", GRPO_VARIANTS[request.param])
    return request.param


def _logits(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Logits with a realistic spread (and a shift, so that the max-subtraction matters)."""
    return (3.0 * torch.randn(shape) + 5.0 * torch.rand(()) - 2.5).to(dtype)


def _check_grad(g: torch.Tensor, g_ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(g).all()
    scale = float(g_ref.abs().max()) + 1e-30
    rtol, atol = (1e-4, 1e-6 * scale) if dtype == torch.float32 else (1.6e-2, 2e-3 * scale)
    torch.testing.assert_close(g.double(), g_ref, rtol=rtol, atol=atol)
    # bf16: the interpreter's fp32 -> bf16 cast truncates (up to 2^-7 relative; the GPU rounds to nearest)
    assert rel_err(g, g_ref) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_available() -> None:
    assert rk.available()


@pytest.mark.parametrize(
    "dtype,T,V,tau",
    [
        (torch.float32, 1, 1, 1.0),
        (torch.float32, 1, 700, 0.7),
        (torch.bfloat16, 37, 1000, 1.0),
        (torch.bfloat16, 64, 257, 1.3),
        (torch.float32, 16, 256, 0.7),
    ],
)
def test_logprob_entropy(poison, dtype, T, V, tau) -> None:
    z = _logits((T, V), dtype)
    y = torch.randint(0, V, (T,))
    logp, ent = rk.logprob_entropy(z, y, temperature=tau)
    r_logp, r_ent = ref_logprob_entropy(z, y, tau)
    assert logp.dtype == torch.float32 and logp.shape == (T,) and ent.shape == (T,)
    torch.testing.assert_close(logp.double(), r_logp, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=5e-5)


def test_logprob_entropy_strided_view(poison) -> None:
    """[B, L+1, V] logits with the last position sliced off: a non-mergeable view, read without a copy."""
    full = _logits((3, 9, 301), torch.bfloat16)
    z = full[:, :-1]
    y = torch.randint(0, 301, (3, 8), dtype=torch.int32)
    logp, ent = rk.logprob_entropy(z, y, temperature=0.8)
    r_logp, r_ent = ref_logprob_entropy(z, y, 0.8)
    assert logp.shape == (3, 8)
    torch.testing.assert_close(logp.double(), r_logp, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=5e-5)


_GRPO_CASES = [
    (torch.float32, (48, 1000), 0.7, 0.04, True, False),
    (torch.bfloat16, (64, 777), 1.0, 0.0, False, True),
    (torch.bfloat16, (1, 513), 0.9, 0.04, True, False),
    (torch.float32, (33, 256), 1.0, 0.1, True, True),
    (torch.bfloat16, (2, 11, 300), 1.2, 0.04, True, False),
]


@pytest.mark.parametrize("dtype,shape,tau,beta,use_ref,inplace", _GRPO_CASES)
def test_grpo_loss(poison, dtype, shape, tau, beta, use_ref, inplace) -> None:
    """Default (GPU) implementation on every case."""
    _grpo_case(dtype, shape, tau, beta, use_ref, inplace)


@pytest.mark.parametrize("dtype,shape,tau,beta,use_ref,inplace", [_GRPO_CASES[1], _GRPO_CASES[4]])
def test_grpo_loss_variants(poison, grpo_variant, dtype, shape, tau, beta, use_ref, inplace) -> None:
    """The other single-rank implementations (selectable by config) on an fp32/bf16, inplace/3-D pair of cases."""
    _grpo_case(dtype, shape, tau, beta, use_ref, inplace)


def _grpo_case(dtype, shape, tau, beta, use_ref, inplace) -> None:
    z = _logits(shape, dtype)
    V = shape[-1]
    y = torch.randint(0, V, shape[:-1])
    old, ref, adv, w = make_grpo_inputs(z, y, tau)
    ref = ref if use_ref else None
    loss_r, stats_r, grad_r = ref_grpo(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, beta, tau)

    x = z.clone().requires_grad_()
    leaf = x
    if inplace:  # the buffer the kernel overwrites must not be a leaf that autograd guards: use a non-leaf
        leaf = z.clone().requires_grad_()
        x = leaf * 1.0
        x.retain_grad()
    loss, stats = rk.grpo_loss(x, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, beta, tau, inplace=inplace)
    loss.backward()
    grad = x.grad if not inplace else leaf.grad

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - float(loss_r)) <= 1e-5 * (abs(float(loss_r)) + float(w.abs().sum()))
    logp, ent, clip, kl = stats
    assert clip.dtype == torch.bool and logp.shape == shape[:-1]
    torch.testing.assert_close(logp.double(), stats_r[0], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ent.double(), stats_r[1], rtol=1e-5, atol=5e-5)
    assert torch.equal(clip, stats_r[2])
    torch.testing.assert_close(kl.double(), stats_r[3], rtol=1e-4, atol=1e-5)
    _check_grad(grad, grad_r, dtype)
    masked = w == 0
    assert bool((grad[masked] == 0).all()), "masked rows must have exact-zero gradients"


def test_grpo_all_masked_no_nan(poison, grpo_variant) -> None:
    """Every token masked, with garbage (inf / nan) in the per-token inputs of masked rows: zero loss and grads."""
    z = _logits((20, 300), torch.bfloat16).requires_grad_()
    y = torch.randint(0, 300, (20,))
    old = torch.full((20,), -math.inf)
    ref = torch.full((20,), math.nan)
    adv = torch.randn(20)
    w = torch.zeros(20)
    loss, stats = rk.grpo_loss(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 0.7)
    loss.backward()
    assert float(loss) == 0.0
    assert bool((z.grad == 0).all())
    for s in stats:
        assert not bool(s.any())


def test_grpo_upstream_gradient(poison) -> None:
    """A non-unit upstream gradient rescales the stored gradient; grad_scale pre-multiplies it instead."""
    z = _logits((60, 300), torch.float32)  # 18000 elements: 5 blocks over 4 programs, so the grid-stride loop turns
    y = torch.randint(0, 300, (60,))
    old, ref, adv, w = make_grpo_inputs(z, y, 1.0)
    _, _, grad_r = ref_grpo(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0)
    for grad_scale, factor in ((1.0, 3.0), (0.5, 0.5)):
        x = z.clone().requires_grad_()
        loss, _ = rk.grpo_loss(x, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0, grad_scale=grad_scale)
        (loss * factor).backward()
        _check_grad(x.grad, grad_r * factor, torch.float32)


def test_grpo_without_grad(poison) -> None:
    z = _logits((9, 300), torch.bfloat16)
    y = torch.randint(0, 300, (9,))
    old, ref, adv, w = make_grpo_inputs(z, y, 1.0)
    loss_r, stats_r, _ = ref_grpo(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0)
    loss, stats = rk.grpo_loss(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0)
    assert abs(float(loss) - float(loss_r)) <= 1e-5 * (abs(float(loss_r)) + float(w.sum()))
    torch.testing.assert_close(stats.logp.double(), stats_r[0], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 5), (torch.bfloat16, None)])
def test_fused_linear_logprob(poison, dtype, chunk) -> None:
    T, H, V = 13, 32, 300
    h = torch.randn(T, H).to(dtype)
    wt = (torch.randn(V, H) / H**0.5 * 3).to(dtype)
    y = torch.randint(0, V, (T,))
    logp, ent = rk.fused_linear_logprob(h, wt, y, temperature=0.9, chunk=chunk)
    # reference from the logits as the same-dtype matmul makes them (fp32 accumulate, rounded to dtype)
    z = (h.float() @ wt.float().t()).to(dtype)
    r_logp, r_ent = ref_logprob_entropy(z, y, 0.9)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(logp.double(), r_logp, **tol)
    torch.testing.assert_close(ent.double(), r_ent, **tol)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_two_gloo_ranks(tmp_path) -> None:
    """The vocab split unevenly over 2 gloo ranks gives the unsplit results (log-prob, entropy, GRPO loss, stats,
    gradient shards, fused linear)."""
    import torch.multiprocessing as mp
    from _r1k_tp_worker import run

    T, V, H, tau = 24, 301, 16, 0.8
    z = _logits((T, V), torch.bfloat16)
    y = torch.randint(0, V, (T,))
    y[:4] = torch.tensor([0, 149, 150, V - 1])  # targets at both sides of the shard boundary
    old, ref, adv, w = make_grpo_inputs(z, y, tau)
    hidden = torch.randn(T, H)
    weight = torch.randn(V, H) / H**0.5 * 3
    inp = dict(z=z, y=y, old=old, ref=ref, adv=adv, w=w, tau=tau, hidden=hidden, weight=weight, bounds=[0, 150, V])
    torch.save(inp, tmp_path / "inputs.pt")
    mp.spawn(run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    logp, ent = rk.logprob_entropy(z, y, tau)
    x = z.clone().requires_grad_()
    loss, stats = rk.grpo_loss(x, y, old, ref, adv, w, 0.2, 0.28, 0.04, tau)
    loss.backward()
    fl_logp, fl_ent = rk.fused_linear_logprob(hidden, weight, y, tau)
    r_logp, r_ent = ref_logprob_entropy(z, y, tau)
    _, _, grad_r = ref_grpo(z, y, old, ref, adv, w, 0.2, 0.28, 0.04, tau)

    close = dict(rtol=1e-5, atol=2e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r["logp"], logp, **close)
        torch.testing.assert_close(r["ent"], ent, **close)
        torch.testing.assert_close(r["logp"].double(), r_logp, **close)
        torch.testing.assert_close(r["ent"].double(), r_ent, **close)
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["g_logp"], stats.logp, **close)
        torch.testing.assert_close(r["g_ent"], stats.entropy, **close)
        assert torch.equal(r["g_clip"], stats.is_clipped)
        torch.testing.assert_close(r["g_kl"], stats.kl, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["fl_logp"], fl_logp, **close)
        torch.testing.assert_close(r["fl_ent"], fl_ent, **close)
    grad_tp = torch.cat([r0["grad"], r1["grad"]], dim=-1)
    torch.testing.assert_close(grad_tp.float(), x.grad.float(), rtol=1.6e-2, atol=1e-3 * float(x.grad.abs().max()))
    _check_grad(grad_tp, grad_r, torch.bfloat16)
    assert bool((grad_tp[w == 0] == 0).all())


def test_cluster_kernel_host_checks() -> None:
    """Off the GPU the CUDA cluster kernel never runs and says why; its slice arithmetic covers the vocabulary in
    16-byte vectors. (The kernel itself: kernels/gpu_tests, on an sm_90+ GPU.)"""
    from r1mega_kernels import cuda_grpo

    z = _logits((4, 300), torch.bfloat16).requires_grad_()
    y = torch.randint(0, 300, (4,))
    old, ref, adv, w = make_grpo_inputs(z.detach(), y, 1.0)
    rk.grpo_loss(z, y, old, ref, adv, w, EPS_LOW, EPS_HIGH, 0.04, 1.0)
    assert ops.LAST_GRPO_PATH == {"path": "triton-fused", "reason": "Triton interpreter"}
    cfg = cuda_grpo.ClusterConfig()
    assert cuda_grpo.unsupported_reason(z, z, (300, 300), 300, cfg) == "not a CUDA tensor"
    for vocab in (8, 40, 1000, 128256, 151936, 151943):
        for cluster in (2, 3, 4, 8):
            chunk = cuda_grpo._chunk(vocab, cluster)
            assert chunk % 8 == 0 and chunk * cluster >= vocab and (chunk - 8) * cluster < vocab
