"""The log-prob passes' kernel choice. Their numerics are checked end to end in tests/test_parallel.py, where the
worker runs with algo.loss_impl=triton under TRITON_INTERPRET=1 (Triton must see it before its first import, so a
fresh process): logprob_entropy at 1 rank and vocab-parallel under TP=2, the fused linear + log-prob under TP=2
(``triton-fused``), against the PyTorch reference run to 1e-5."""

from __future__ import annotations

from r1mega.grpo.logprobs import choose_logprob_impl


def test_choice_follows_the_loss_kernel_rule():
    assert choose_logprob_impl("auto", on_gpu=True, available=True, fused_lm_head=False) == "kernel"
    assert choose_logprob_impl("auto", on_gpu=True, available=True, fused_lm_head=True) == "fused"
    assert choose_logprob_impl("auto", on_gpu=False, available=True, fused_lm_head=True) == "torch"  # CPU: torch
    assert choose_logprob_impl("auto", on_gpu=True, available=False, fused_lm_head=True) == "torch"
    assert choose_logprob_impl("torch", on_gpu=True, available=True, fused_lm_head=True) == "torch"
    assert choose_logprob_impl("triton", on_gpu=False, available=True, fused_lm_head=False) == "kernel"
