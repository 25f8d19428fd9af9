"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (GQA + q/k norms), softmax top-k router
(``mlp.gate``), per-expert SwiGLU experts, no shared expert; optional leading dense layers (``mlp_only_layers``)."""

from __future__ import annotations

from typing import Any, Optional

from r1mega.config import ModelConfig
from r1mega.model.families.base import Family, Layout, gqa_from_hf, gqa_hf_config, gqa_layouts, require


class Qwen3Moe(Family):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = {"Qwen3MoeForCausalLM": "qwen3_moe"}

    def config_from_hf(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        kw = self.common_from_hf(hf, arch)
        kw.update(gqa_from_hf(hf, qk_norm=True))
        layers = hf["num_hidden_layers"]
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported: only 1")
        dense = sorted(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))) or len(dense) >= layers:
            raise ValueError(
                f"mlp_only_layers={dense} is not supported: dense layers must be the first k (first_k_dense_layers)"
            )
        norm_topk = bool(hf.get("norm_topk_prob", False))
        kw.update(
            # transformers 5 writes num_local_experts (its attribute map reads the published num_experts too)
            num_experts=hf.get("num_local_experts") or require(hf, "num_experts", arch),
            moe_ffn_hidden_size=require(hf, "moe_intermediate_size", arch),
            moe_router_topk=require(hf, "num_experts_per_tok", arch),
            moe_shared_expert_intermediate_size=None,
            moe_router_score_function="softmax",
            moe_router_enable_expert_bias=False,
            # norm_topk_prob=false: softmax over all experts, then top-k (megatron's pre_softmax); true: the
            # softmax of the top-k logits (= the renormalised top-k probabilities)
            moe_router_pre_softmax=not norm_topk,
            moe_router_topk_scaling_factor=None,
            moe_router_num_groups=None,
            moe_router_group_topk=None,
            first_k_dense_layers=len(dense),
        )
        return kw

    def architecture_for(self, m: ModelConfig) -> Optional[str]:
        if not m.is_moe or m.multi_latent_attention or m.position_embedding_type != "rope":
            return None
        why = []
        if m.moe_router_score_function != "softmax":
            why.append(f"moe_router_score_function={m.moe_router_score_function!r} (Qwen3-MoE: softmax)")
        if m.moe_router_enable_expert_bias:
            why.append("moe_router_enable_expert_bias=true")
        if m.moe_shared_expert_intermediate_size:
            why.append("shared experts")
        if m.moe_router_num_groups or (m.moe_router_topk_scaling_factor or 1.0) != 1.0:
            why.append("group-limited routing / topk scaling")
        if not m.qk_layernorm:
            why.append("qk_layernorm=false (Qwen3-MoE has q/k norms)")
        if m.add_qkv_bias:
            why.append("add_qkv_bias=true")
        if why:
            raise ValueError(
                "a GQA MoE model exports only as Qwen3MoeForCausalLM, which it does not match: " + ", ".join(why)
            )
        return self.architectures[0]

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        return dict(
            **gqa_hf_config(m),
            mlp_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=m.num_layers,
            num_experts=m.num_experts,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts_per_tok=m.moe_router_topk,
            norm_topk_prob=not m.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(m.first_k_dense_layers)),
            router_aux_loss_coef=0.0,
            output_router_logits=False,
        )

    def layer_layouts(self, m: ModelConfig, arch: str) -> dict[str, Layout]:
        return {**super().layer_layouts(m, arch), **gqa_layouts(m)}
