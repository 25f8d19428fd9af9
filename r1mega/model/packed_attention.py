"""Packed (THD) sequences for megatron's local attention, which refuses them (only TE's attention takes them).

Exact reference: the packed row [T] is attended as one sequence with a block-diagonal causal mask built from
``cu_seqlens`` (a token sees earlier tokens of its own sequence only), through the local
``DotProductAttention`` itself, so softmax, scaling and GQA are megatron's. O(T^2) memory: meant for the CPU
(tests, CI) and GPUs without Transformer Engine; with TE the engine's THD microbatches go to its fused kernels.
"""

from __future__ import annotations

import torch


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True = masked: causal within each [cu[i], cu[i+1]) block, everything across masked."""
    cu = cu_seqlens.to(torch.long)
    seq = torch.bucketize(torch.arange(total, device=cu.device), cu[1:], right=True)
    pos = torch.arange(total, device=cu.device)
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed).view(1, 1, total, total)


def packed_local_attention(base=None):
    """``base`` (megatron's local DotProductAttention by default) accepting THD ``packed_seq_params``."""
    if base is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention as base

    class PackedDotProductAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):  # fmt: skip
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                return super().forward(
                    query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
                )
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            q, k, v = (x.unsqueeze(1) for x in (query, key, value))  # [t, h, d] -> [t, b=1, h, d]
            mask = block_causal_mask(cu, q.shape[0])
            return super().forward(q, k, v, mask, attn_mask_type, attention_bias, None)  # [t, 1, h * d]

    return PackedDotProductAttention
