"""DeepSeek-V3 / V2 (and Moonlight, V2-Lite): Multi-head Latent Attention + DeepSeekMoE (fine-grained routed
experts, always-on shared experts, the first ``first_k_dense_replace`` layers dense).

MLA naming: DeepSeek splits each query/key head into a position-free part (``qk_nope_head_dim``) and a rotary
part (``qk_rope_head_dim``); megatron calls them ``qk_head_dim`` and ``qk_pos_emb_head_dim`` (so megatron's
qk_head_dim is NOT the full q/k head width). ``q_lora_rank`` null (V2-Lite, Moonlight) = a direct query
projection. DeepSeek always normalises the latents (``kv_a_layernorm``, ``q_a_layernorm``): megatron builds
those norms only with qk_layernorm, so it is on. ``num_key_value_heads`` is meaningless for MLA and ignored.

MLA weights need renaming only, no permutation: ``linear_kv_up_proj`` is per head [k_nope; v] = ``kv_b_proj``,
``linear_kv_down_proj`` is [kv_lora_rank; rope] = ``kv_a_proj_with_mqa``, ``linear_q_(up_)proj`` per head
[nope; rope] = ``q_(b_)proj``; megatron's MLA rope de-interleaves the rope dims, exactly DeepSeek's checkpoints
and transformers' ``rope_interleave=True`` (written into config.json). The down projections are replicated over
TP. ``router.expert_bias`` (a float32 buffer) <-> ``mlp.gate.e_score_correction_bias``; a V3 export of a router
without expert bias writes zeros (same routing). The MTP layers of V3 (``num_nextn_predict_layers``, layer
indices >= num_hidden_layers) are a pre-training auxiliary: not built, their tensors ignored on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from r1mega.config import ModelConfig
from r1mega.model.families.base import Family, GateUp, Layout, Named, Rename, require, rope

V2, V3 = "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"


@dataclass(frozen=True)
class V3Router(Rename):
    """DeepSeek-V3 always adds ``e_score_correction_bias``: a router without expert bias exports a zero one."""

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        out = super().to_hf(pre, full, m)
        if not m.moe_router_enable_expert_bias:
            out.append((pre + "mlp.gate.e_score_correction_bias", torch.zeros(full.shape[0], device=full.device)))
        return out


class DeepseekV3(Family):
    name = "deepseek_v3"
    architectures = (V3, V2)
    model_types = {V3: "deepseek_v3", V2: "deepseek_v2"}
    rope_scaling_ok = True

    # ---------------------------------------------------------------- config.json -> ModelConfig
    def config_from_hf(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        kw = self.common_from_hf(hf, arch)
        kw.update(self._attention(hf, arch))
        kw.update(self._moe(hf, arch))
        return kw

    def _attention(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            multi_latent_attention=True,
            qk_layernorm=True,
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=require(hf, "kv_lora_rank", arch),
            qk_head_dim=require(hf, "qk_nope_head_dim", arch),
            qk_pos_emb_head_dim=require(hf, "qk_rope_head_dim", arch),
            v_head_dim=require(hf, "v_head_dim", arch),
        )
        _, scaling = rope(hf)
        if scaling is None:
            kw["rope_type"] = "rope"
            return kw
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "yarn":
            raise ValueError(f"rope_scaling type {kind!r} is not supported for MLA (only 'yarn', or none)")
        # YaRN as DeepSeek implements it; megatron's YarnRotaryEmbedding + MLA softmax_scale do the same with
        # these fields; the defaults are those of DeepSeek's modeling code.
        kw.update(
            rope_type="yarn",
            rotary_scaling_factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast", 32)),
            beta_slow=float(scaling.get("beta_slow", 1)),
            mscale=float(scaling.get("mscale", 1.0)),
            mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
        )
        return kw

    def _moe(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        """``intermediate_size`` is the dense FFN of the first layers, ``moe_intermediate_size`` ONE expert's;
        the ``n_shared_experts`` shared experts run as one MLP n_shared_experts times wider (same function)."""
        v3 = arch == V3
        experts = hf.get("n_routed_experts")
        if not experts:
            raise ValueError(f"{arch} config.json has no n_routed_experts: dense DeepSeek models are not supported")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(
                f"moe_layer_freq={hf['moe_layer_freq']} is not supported: only 1 (every layer after the dense)"
            )
        width = require(hf, "moe_intermediate_size", arch)
        topk = require(hf, "num_experts_per_tok", arch)
        shared = hf.get("n_shared_experts") or 0
        # defaults below are those of the architectures' own configuration classes
        score = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
        method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
        norm_topk = bool(hf.get("norm_topk_prob", v3))
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func={score!r} is not supported (softmax or sigmoid)")
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method={method!r} is not supported (greedy, group_limited_greedy, noaux_tc)")
        if method == "noaux_tc" and score != "sigmoid":
            raise ValueError("topk_method='noaux_tc' with scoring_func != 'sigmoid' is not supported by megatron")
        if score == "sigmoid" and not norm_topk and topk > 1:
            # megatron always renormalises the selected sigmoid scores to sum to 1 (when topk > 1)
            raise ValueError("scoring_func='sigmoid' with norm_topk_prob=false is not supported by megatron")
        groups = hf.get("n_group") or 1
        group_topk = hf.get("topk_group") or 1
        if groups > 1:
            # megatron ranks a group by the sum of its top (topk // group_topk) scores; DeepSeek-V3's noaux_tc
            # by the sum of its top-2, DeepSeek-V2's group_limited_greedy by its maximum
            want = {"noaux_tc": 2, "group_limited_greedy": 1}.get(method)
            if want is None or topk // group_topk != want:
                raise ValueError(
                    f"group-limited routing n_group={groups}, topk_group={group_topk}, topk_method={method!r}, "
                    f"num_experts_per_tok={topk} scores groups differently from megatron "
                    f"(which sums each group's top num_experts_per_tok // topk_group = {topk // group_topk})"
                )
        scaling = float(hf.get("routed_scaling_factor", 1.0))
        return dict(
            num_experts=experts,
            moe_ffn_hidden_size=width,
            moe_router_topk=topk,
            moe_shared_expert_intermediate_size=shared * width or None,
            moe_router_score_function=score,
            # noaux_tc = aux-loss-free balancing: a per-expert bias added to the scores for the top-k choice only
            moe_router_enable_expert_bias=method == "noaux_tc",
            # softmax + norm_topk_prob=false (V2-Lite): softmax over all experts, then top-k, unnormalised
            moe_router_pre_softmax=score == "softmax" and not norm_topk,
            moe_router_topk_scaling_factor=scaling if scaling != 1.0 else None,
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=group_topk if groups > 1 else None,
            # DeepSeek computes the gate in fp32; sigmoid scores + a small bias need it (GPU only)
            moe_router_dtype="fp32" if score == "sigmoid" else None,
            first_k_dense_layers=hf.get("first_k_dense_replace", 0),
        )

    # ---------------------------------------------------------------- ModelConfig -> config.json
    def architecture_for(self, m: ModelConfig) -> Optional[str]:
        if not m.multi_latent_attention:
            return None
        if not m.is_moe:
            raise ValueError("dense MLA models have no HF architecture here (DeepSeek configs are MoE)")
        if not m.qk_layernorm:
            raise ValueError("MLA without qk_layernorm: DeepSeek always normalises the q / kv latents")
        return V3 if m.moe_router_score_function == "sigmoid" else V2

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        v3 = arch == V3
        shared = m.moe_shared_expert_intermediate_size or 0
        if shared % m.moe_ffn_hidden_size:
            raise ValueError(
                f"moe_shared_expert_intermediate_size={shared} is not a multiple of moe_ffn_hidden_size="
                f"{m.moe_ffn_hidden_size}: DeepSeek's shared experts are n_shared_experts * moe_intermediate_size"
            )
        groups, group_topk = m.moe_router_num_groups or 1, m.moe_router_group_topk or 1
        if v3:
            if m.moe_router_pre_softmax:
                raise ValueError("moe_router_pre_softmax=true has no DeepSeek-V3 equivalent")
            if groups > 1 and m.moe_router_topk // group_topk != 2:
                raise ValueError(
                    "DeepSeek-V3 ranks groups by their top-2 sum: needs moe_router_topk // group_topk == 2"
                )
            method = "noaux_tc"  # a router without expert bias exports a zero e_score_correction_bias
        else:
            if groups > 1 and m.moe_router_topk // group_topk != 1:
                raise ValueError("DeepSeek-V2 ranks groups by their max: needs moe_router_topk // group_topk == 1")
            method = "group_limited_greedy" if groups > 1 else "greedy"
        kw: dict[str, Any] = dict(
            num_key_value_heads=m.num_attention_heads,
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_head_dim,
            qk_rope_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            n_routed_experts=m.num_experts,
            n_shared_experts=shared // m.moe_ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts_per_tok=m.moe_router_topk,
            first_k_dense_replace=m.first_k_dense_layers,
            moe_layer_freq=1,
            scoring_func=m.moe_router_score_function,
            topk_method=method,
            norm_topk_prob=v3 or not m.moe_router_pre_softmax,
            routed_scaling_factor=float(m.moe_router_topk_scaling_factor or 1.0),
            n_group=groups,
            topk_group=group_topk,
            aux_loss_alpha=0.0,
            seq_aux=False,
            num_nextn_predict_layers=0,
            ep_size=1,
        )
        if v3:
            kw["rope_interleave"] = True  # megatron's MLA rope is the interleaved one (module docstring)
        if m.rope_type == "yarn":
            kw["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": float(m.rotary_scaling_factor),
                "original_max_position_embeddings": int(m.original_max_position_embeddings),
                "beta_fast": float(m.beta_fast),
                "beta_slow": float(m.beta_slow),
                "mscale": float(m.mscale),
                "mscale_all_dim": float(m.mscale_all_dim),
            }
        elif m.rope_type != "rope":
            raise ValueError(f"rope_type={m.rope_type!r} is not exportable (rope or yarn)")
        return kw

    # ---------------------------------------------------------------- weights
    def layer_layouts(self, m: ModelConfig, arch: str) -> dict[str, Layout]:
        a = "self_attention."
        out = super().layer_layouts(m, arch)
        out.update(
            {
                a + "q_layernorm.weight": Rename("self_attn.q_a_layernorm.weight"),
                a + "linear_q_up_proj.layer_norm_weight": Rename("self_attn.q_a_layernorm.weight"),  # TE
                a + "kv_layernorm.weight": Rename("self_attn.kv_a_layernorm.weight"),
                a + "linear_kv_up_proj.layer_norm_weight": Rename("self_attn.kv_a_layernorm.weight"),  # TE
                a + "linear_q_proj.weight": Rename("self_attn.q_proj.weight"),
                a + "linear_q_down_proj.weight": Rename("self_attn.q_a_proj.weight"),
                a + "linear_q_up_proj.weight": Rename("self_attn.q_b_proj.weight"),
                a + "linear_kv_down_proj.weight": Rename("self_attn.kv_a_proj_with_mqa.weight"),
                a + "linear_kv_up_proj.weight": Rename("self_attn.kv_b_proj.weight"),
                "mlp.shared_experts.linear_fc1.weight": GateUp(
                    "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"
                ),
                "mlp.shared_experts.linear_fc2.weight": Rename("mlp.shared_experts.down_proj.weight"),
            }
        )
        if m.is_moe and arch == V3:
            out["mlp.router.weight"] = V3Router("mlp.gate.weight")
            out["mlp.router.expert_bias"] = Rename("mlp.gate.e_score_correction_bias")
        return out

    def ignored_hf(self, name: str, m: ModelConfig) -> bool:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        mtp = layer is not None and layer.isdigit() and int(layer) >= m.num_layers
        return mtp or super().ignored_hf(name, m)
