"""The chunked linear + log-prob with its own backward (train.fused_lm_head_train) against fp64 autograd over the
whole logits: values, the hidden states' and the weight's gradients, through log-prob and entropy, any chunking,
and vocab-parallel over two gloo ranks. Its use in the trainer under TP / PP: tests/test_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1mega.grpo.fused_lm_head import check_objective, chunked_linear_logprob
from tests.launch import free_port

N, H, V, T = 13, 8, 29, 0.7


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    a, b = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, targets, a, b


def reference(h, w, targets, a, b):
    """fp64 autograd through the whole [N, V] logits: loss = sum(a * logp) + sum(b * entropy)."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logprobs = torch.log_softmax(h @ w.t() / T, dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    ent = -(logprobs.exp() * logprobs).sum(-1)
    ((a * logp).sum() + (b * ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 4, 13, None])
def test_matches_fp64_autograd(chunk):
    h, w, targets, a, b = problem()
    ref_logp, ref_ent, ref_gh, ref_gw = reference(h, w, targets, a, b)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = chunked_linear_logprob(hh, ww, targets, T, chunk=chunk)
    ((a * logp).sum() + (b * ent).sum()).backward()
    for got, want in ((logp, ref_logp), (ent, ref_ent), (hh.grad, ref_gh), (ww.grad, ref_gw)):
        torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)


def test_logp_only_and_batch_shape():
    """Entropy unused (the GRPO loss: a metric): no gradient through it; [b, s, H] hidden states keep the shape."""
    h, w, targets, a, _ = problem(1)
    _, _, ref_gh, ref_gw = reference(h, w, targets, a, torch.zeros(N, dtype=torch.float64))
    hh, ww = h.clone().reshape(1, N, H).requires_grad_(), w.clone().requires_grad_()
    logp, ent = chunked_linear_logprob(hh, ww, targets.reshape(1, N), T, chunk=5)
    assert logp.shape == ent.shape == (1, N)
    (a * logp.reshape(-1)).sum().backward()
    torch.testing.assert_close(hh.grad.reshape(N, H), ref_gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ww.grad, ref_gw, rtol=1e-10, atol=1e-12)


def _tp_rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        h, w, targets, a, b = problem(2)
        shard = (V + 1) // 2
        lo, hi = rank * shard, min(V, (rank + 1) * shard)
        hh, ww = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        logp, ent = chunked_linear_logprob(hh, ww, targets, T, group=dist.group.WORLD, vocab_start=lo, chunk=4)
        ((a * logp).sum() + (b * ent).sum()).backward()
        gh = hh.grad.clone()
        dist.all_reduce(gh)  # what the sequence-parallel region's backward does around the output layer
        out[rank] = (logp.detach(), ent.detach(), gh, ww.grad, lo, hi)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_two_ranks():
    """Two gloo ranks, each with half of the vocab (the targets fall in both halves): the same log-probs and
    entropy on both, the summed hidden-state gradient and each rank's rows of the weight gradient as fp64's."""
    h, w, targets, a, b = problem(2)
    assert (targets < (V + 1) // 2).any() and (targets >= (V + 1) // 2).any()
    ref_logp, ref_ent, ref_gh, ref_gw = reference(h, w, targets, a, b)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tp_rank, args=(free_port(), out), nprocs=2)
        results = dict(out)
    for logp, ent, gh, gw, lo, hi in results.values():
        for got, want in ((logp, ref_logp), (ent, ref_ent), (gh, ref_gh), (gw, ref_gw[lo:hi])):
            torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)


def test_objective_without_loss_from_logprobs_is_refused():
    class LogitsOnly:
        def loss(self, mb, logits): ...

    check_objective(LogitsOnly, enabled=False)
    with pytest.raises(Exception, match="train.fused_lm_head_train=true.*LogitsOnly.*loss_from_logprobs"):
        check_objective(LogitsOnly, enabled=True)
    from r1mega.objectives.grpo import GRPOObjective
    from r1mega.objectives.sft import SFTObjective

    check_objective(GRPOObjective, enabled=True)
    check_objective(SFTObjective, enabled=True)


def test_bf16_inputs_fp32_statistics():
    """bf16 hidden states and weight (the GPU case): fp32 log-probs near fp64's, gradients in the inputs' dtype."""
    h, w, targets, a, b = problem(3)
    ref_logp, _, ref_gh, _ = reference(h, w, targets, a, b)
    hh, ww = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    logp, ent = chunked_linear_logprob(hh, ww, targets, T, chunk=4)
    ((a.float() * logp).sum() + (b.float() * ent).sum()).backward()
    assert logp.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == torch.bfloat16
    assert (logp.double() - ref_logp).abs().max() < 0.1 and (hh.grad.double() - ref_gh).abs().max() < 0.1
