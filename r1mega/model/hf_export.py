"""megatron-core GPTModel -> Hugging Face checkpoint names and layouts (the weight push to SGLang).

Two functions:

- :func:`hf_config_from_model_config`: our :class:`~r1mega.config.ModelConfig` -> a ``config.json`` dict, the
  inverse of :func:`r1mega.model.hf_config.model_config_from_hf` (round-trips the conf/model/*.yaml files).
- :func:`export_hf` / :func:`iter_hf_buckets`: the policy's parameters under the names and layouts of the
  Hugging Face *checkpoint* format (per-expert ``mlp.experts.{e}.gate_proj.weight``, not transformers-5's
  fused in-memory experts), which is what both ``transformers.from_pretrained`` and SGLang's ``load_weights``
  read.

Architectures (:func:`hf_architecture` picks one from the ModelConfig): ``Qwen3MoeForCausalLM`` (GQA,
q/k-norm, softmax router), ``DeepseekV3ForCausalLM`` (MLA, sigmoid router + ``e_score_correction_bias``;
Moonlight too), ``DeepseekV2ForCausalLM`` (MLA, softmax router), dense ``Qwen3ForCausalLM`` (q/k-norm) and
``LlamaForCausalLM``. Proven on CPU against the transformers classes (logits equal to ~1e-5, fp32):
tests/test_hf_export.py.

Layout facts (checked against megatron-core 0.16.1 and transformers 5.24 sources):

- fused QKV ``linear_qkv.weight`` is interleaved per query group: rows ``[q heads of group g, k_g, v_g]``
  for g = 0..groups-1; HF's q_proj head ``g * heads_per_group + j`` is megatron's head j of group g.
- SwiGLU ``linear_fc1.weight`` is ``[gate; up]``; under TP each rank holds ``[gate_r; up_r]``, so a TP
  gather must un-interleave the halves (``_cat_shards(gated=True)``).
- MLA ``linear_kv_up_proj.weight`` is per head ``[k_nope (qk_head_dim); v (v_head_dim)]``, exactly HF's
  ``kv_b_proj`` (HF and SGLang split it into k_nope / v themselves); ``linear_kv_down_proj`` is
  ``[kv_lora_rank; rope dim]`` = ``kv_a_proj_with_mqa``; ``linear_q_up_proj`` / ``linear_q_proj`` is per head
  ``[nope; rope]`` = ``q_b_proj`` / ``q_proj``. So MLA needs renaming only, no permutation.
- rope interleaving: megatron's MLA rope (``_apply_rotary_pos_emb_bshd(multi_latent_attention=True)``)
  first de-interleaves the rope dims (``x[0::2], x[1::2]``) and then rotates halves, i.e. it treats the
  weights' rope dims as interleaved pairs (x0, x1), (x2, x3)..., exactly as DeepSeek's checkpoints,
  transformers' ``DeepseekV3`` with ``rope_interleave=True`` (its default, written into config.json here),
  transformers' ``DeepseekV2`` (complex pairs) and SGLang (``is_neox_style=False``). No permutation.
  GQA models (Qwen3, Llama) rotate halves (neox style) on both sides.
- ``router.expert_bias`` (a float32 buffer, not a parameter) -> ``mlp.gate.e_score_correction_bias``;
  a DeepSeek-V3 export of a router without expert bias writes zeros (same routing).
- DeepSeek-V2 with ``norm_topk_prob=true`` (megatron softmax router, pre_softmax=false): SGLang renormalises
  the top-k weights as megatron does; transformers' ``DeepseekV2`` ignores the flag (its forward differs).
  V2-Lite itself has norm_topk_prob=false (pre-softmax), which all three compute alike.
- vocab: the embedding and output rows are padded (``padded_vocab_size``); the export slices them back
  to the real vocab, which is what config.json's ``vocab_size`` says.

Parallel layouts and the gather strategy (collective: every rank of the model must iterate the same
generator in lock-step; the tensors come out whole on every rank of the TP / EP groups):

- TP: a parameter that megatron marks ``tensor_model_parallel`` is all-gathered over its TP group along its
  ``partition_dim`` (expert weights over the expert-TP group); replicated ones (norms, router, MLA
  down-projections, expert bias) are taken as they are. One parameter at a time, so the peak extra memory
  is one full parameter (the embedding, 1.9 GB bf16 for DeepSeek-V3) plus the caller's bucket.
- EP: each rank converts its local experts; expert slot j is all-gathered over the EP group, giving global
  experts ``r * num_local_experts + j`` for every EP rank r -- one expert tensor per EP rank at a time.
- PP: each stage exports only its own layers, named with their global layer number
  (``layer.layer_number - 1``); the embedding / final norm / lm_head come from the first / last stage.
  Bringing stages together is the caller's business (the SGLang engine refuses PP > 1 for now).
Nothing materialises the whole model on one device: :func:`iter_hf_buckets` groups the stream into
buckets of about ``bucket_bytes``.

Supported megatron names: the local spec (``input_layernorm``, ``pre_mlp_layernorm``, ``linear_qkv``,
``q_layernorm``/``k_layernorm``/``kv_layernorm``, ``mlp.experts.local_experts.{j}.linear_fc1``,
``mlp.shared_experts.*``, ``mlp.router.*``) and the Transformer Engine spec (fused
``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, ``linear_q_up_proj.layer_norm_weight``,
``linear_kv_up_proj.layer_norm_weight``, grouped experts ``mlp.experts.linear_fc1.weight{j}``). Anything
else (legacy GroupedMLP ``weight1``, a shared-expert gate, biases, MTP layers) raises ValueError, so a
spec change cannot silently drop a weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1mega.config import ModelConfig

Named = tuple[str, torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


# ============================================================================================ config.json


def hf_architecture(m: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what our megatron model computes.

    Raises ValueError naming the field when none does (e.g. the tiny_moe default: GQA attention with a
    sigmoid router and shared experts exists in no supported HF architecture).
    """
    if m.normalization != "RMSNorm" or m.activation != "swiglu":
        raise ValueError(
            f"normalization={m.normalization!r}, activation={m.activation!r}: HF export needs RMSNorm + swiglu"
        )
    if m.rotary_percent != 1.0:
        raise ValueError(f"rotary_percent={m.rotary_percent} is not supported by the HF export (only 1.0)")
    if m.multi_latent_attention:
        if not m.is_moe:
            raise ValueError("dense MLA models have no HF architecture here (DeepSeek configs are MoE)")
        if not m.qk_layernorm:
            raise ValueError("MLA without qk_layernorm: DeepSeek always normalises the q / kv latents")
        return "DeepseekV3ForCausalLM" if m.moe_router_score_function == "sigmoid" else "DeepseekV2ForCausalLM"
    if m.position_embedding_type != "rope":
        raise ValueError(f"position_embedding_type={m.position_embedding_type!r}: only rope is exportable")
    if not m.is_moe:
        return "Qwen3ForCausalLM" if m.qk_layernorm else "LlamaForCausalLM"
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
    if why:
        raise ValueError(
            "a GQA MoE model exports only as Qwen3MoeForCausalLM, which it does not match: " + ", ".join(why)
        )
    return "Qwen3MoeForCausalLM"


_MODEL_TYPE = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}


def hf_config_from_model_config(
    m: ModelConfig,
    vocab_size: int,
    *,
    dtype: str = "bfloat16",
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
) -> dict[str, Any]:
    """``config.json`` (as a dict) of the HF model equal to ``m``: the inverse of ``model_config_from_hf``.

    ``vocab_size`` is the real (tokenizer) vocab, not megatron's padded one. Rope is written in the
    legacy ``rope_theta`` + ``rope_scaling`` form, which transformers 4 and 5 and SGLang all read.
    """
    arch = hf_architecture(m)
    heads = m.num_attention_heads
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type=_MODEL_TYPE[arch],
        vocab_size=int(vocab_size),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base,
        rope_scaling=None,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_method_std,
        torch_dtype=dtype,
        use_cache=True,
    )
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    if m.multi_latent_attention:
        hf.update(_deepseek_fields(m, arch))
    else:
        head_dim = m.kv_channels or m.hidden_size // heads
        hf.update(num_key_value_heads=m.num_query_groups or heads, head_dim=head_dim, mlp_bias=False)
        if arch.startswith("Qwen3"):
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
        if arch == "Qwen3MoeForCausalLM":
            hf.update(
                num_experts=m.num_experts,
                moe_intermediate_size=m.moe_ffn_hidden_size,
                num_experts_per_tok=m.moe_router_topk,
                # megatron pre_softmax=false: softmax over the top-k logits = renormalised top-k probabilities
                norm_topk_prob=not m.moe_router_pre_softmax,
                decoder_sparse_step=1,
                mlp_only_layers=list(range(m.first_k_dense_layers)),
                router_aux_loss_coef=0.0,
                output_router_logits=False,
            )
    return hf


def _deepseek_fields(m: ModelConfig, arch: str) -> dict[str, Any]:
    v3 = arch == "DeepseekV3ForCausalLM"
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
            raise ValueError("DeepSeek-V3 ranks groups by their top-2 sum: needs moe_router_topk // group_topk == 2")
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
        kw["rope_interleave"] = True  # see the module docstring: megatron's MLA rope is the interleaved one
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


# ============================================================================================ weights


class _Groups:
    """The process groups of the export (None where a dimension is 1 or torch.distributed is off)."""

    def __init__(self) -> None:
        self.tp = self.etp = self.ep = None
        self.ep_rank = 0
        if not (dist.is_available() and dist.is_initialized()):
            return
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return
        big = lambda g: g if g is not None and dist.get_world_size(g) > 1 else None  # noqa: E731
        self.tp = big(ps.get_tensor_model_parallel_group(check_initialized=False))
        self.etp = big(ps.get_expert_tensor_parallel_group(check_initialized=False))
        self.ep = big(ps.get_expert_model_parallel_group(check_initialized=False))
        self.ep_rank = dist.get_rank(self.ep) if self.ep is not None else 0


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _cat_shards(shards: list[torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """Concatenate TP shards; a SwiGLU fc1 shard is [gate_r; up_r], so gates and ups are joined apart."""
    if len(shards) == 1:
        return shards[0]
    if not gated:
        return torch.cat(shards, dim=dim)
    halves = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)


def _full(param: torch.Tensor, group, gated: bool) -> torch.Tensor:
    """The whole (TP-gathered) megatron tensor of ``param``."""
    if group is None or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    return _cat_shards(_all_gather(param, group), int(param.partition_dim), gated)


class _Exporter:
    def __init__(self, model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype]) -> None:
        self.model, self.cfg, self.vocab = model, cfg, vocab_size
        self.arch = hf_architecture(cfg)
        self.dtype = dtype
        self.g = _Groups()
        self.gated = cfg.activation == "swiglu"
        self.layer_of = {}  # local layer index -> global layer index (pipeline stages number from 0)
        decoder = getattr(model, "decoder", None)
        for i, layer in enumerate(getattr(decoder, "layers", [])):
            self.layer_of[i] = int(layer.layer_number) - 1
        self.num_local_experts = 0
        if cfg.is_moe:
            self.num_local_experts = cfg.num_experts // (dist.get_world_size(self.g.ep) if self.g.ep else 1)

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or not t.is_floating_point() or name.endswith("e_score_correction_bias"):
            return t
        return t.to(self.dtype)

    def groups(self) -> Iterator[list[Named]]:
        """HF tensors, one list per megatron tensor (the unit a bucket never splits)."""
        named = list(self.model.named_parameters())
        named += [(n, b) for n, b in self.model.named_buffers() if n.endswith("mlp.router.expert_bias")]
        for name, p in named:
            for group in self._convert(name, p):
                yield [(n, self._cast(n, t)) for n, t in group]

    # ------------------------------------------------------------------------------------ mapping
    def _convert(self, name: str, p: torch.Tensor) -> Iterator[list[Named]]:
        if name == "embedding.word_embeddings.weight":
            yield [("model.embed_tokens.weight", _full(p, self.g.tp, False)[: self.vocab])]
            return
        if name == "output_layer.weight":
            if not self.cfg.tie_embeddings:  # tied: the last stage's copy of the embedding
                yield [("lm_head.weight", _full(p, self.g.tp, False)[: self.vocab])]
            return
        if name == "decoder.final_layernorm.weight":
            yield [("model.norm.weight", p.detach())]
            return
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"HF export: unexpected megatron parameter {name!r}")
        layer, rest = self.layer_of[int(m.group(1))], m.group(2)
        pre = f"model.layers.{layer}."
        if rest.startswith("mlp.experts."):
            yield from self._experts(pre, rest, p)
            return
        yield self._layer_tensor(pre, rest, p)

    def _layer_tensor(self, pre: str, rest: str, p: torch.Tensor) -> list[Named]:
        tp, gated = self.g.tp, self.gated
        simple = {
            "input_layernorm.weight": "input_layernorm.weight",
            "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE: fused into QKV
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE: fused into fc1
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
            "mlp.router.weight": "mlp.gate.weight",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
            "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
        }
        if self.cfg.multi_latent_attention:
            simple.update(
                {
                    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
                    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
                    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
                    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
                    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
                    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
                    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
                    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
                    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
                }
            )
        if rest in simple:
            out = [(pre + simple[rest], _full(p, tp, False))]
            if rest == "mlp.router.weight" and self.arch == "DeepseekV3ForCausalLM":
                if not self.cfg.moe_router_enable_expert_bias:  # V3 always adds the bias: a zero one
                    out.append((pre + "mlp.gate.e_score_correction_bias", torch.zeros(p.shape[0], device=p.device)))
            return out
        if rest == "mlp.router.expert_bias":
            if self.arch != "DeepseekV3ForCausalLM":
                raise ValueError(f"{self.arch} has no expert bias (e_score_correction_bias)")
            return [(pre + "mlp.gate.e_score_correction_bias", p.detach().float())]
        if rest == "self_attention.linear_qkv.weight":
            return self._split_qkv(pre, _full(p, tp, False))
        if rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
            mlp = "mlp.shared_experts." if "shared" in rest else "mlp."
            gate, up = _full(p, tp, gated).chunk(2, dim=0)
            return [(pre + mlp + "gate_proj.weight", gate), (pre + mlp + "up_proj.weight", up)]
        raise ValueError(f"HF export: unexpected megatron layer parameter {rest!r}")

    def _split_qkv(self, pre: str, w: torch.Tensor) -> list[Named]:
        """megatron's [groups x (q heads of the group, k, v)] rows -> HF q_proj / k_proj / v_proj."""
        c = self.cfg
        heads, groups = c.num_attention_heads, c.num_query_groups or c.num_attention_heads
        d = c.kv_channels or c.hidden_size // heads
        w = w.reshape(groups, heads // groups + 2, d, w.shape[-1])
        q = w[:, : heads // groups].reshape(heads * d, -1)
        k = w[:, heads // groups].reshape(groups * d, -1)
        v = w[:, heads // groups + 1].reshape(groups * d, -1)
        return [
            (pre + "self_attn.q_proj.weight", q),
            (pre + "self_attn.k_proj.weight", k),
            (pre + "self_attn.v_proj.weight", v),
        ]

    def _experts(self, pre: str, rest: str, p: torch.Tensor) -> Iterator[list[Named]]:
        m = _LOCAL_EXPERT.match(rest)
        if m is not None:
            local, which = int(m.group(1)), m.group(2)
        else:
            m = _TE_EXPERT.match(rest)
            if m is None:
                raise ValueError(
                    f"HF export: unexpected expert parameter {rest!r} (legacy GroupedMLP weight1/weight2 is "
                    "not supported; megatron's TE spec builds TEGroupedMLP)"
                )
            which, local = m.group(1), int(m.group(2))
        fc1 = which == "linear_fc1"
        w = _full(p, self.g.etp, self.gated and fc1)
        parts = list(w.chunk(2, dim=0)) if fc1 else [w]
        suffixes = ["gate_proj.weight", "up_proj.weight"] if fc1 else ["down_proj.weight"]
        if self.g.ep is None:
            gathered = [[t] for t in parts]
        else:  # expert slot `local` of every EP rank r is global expert r * num_local + local
            gathered = [_all_gather(t, self.g.ep) for t in parts]
        for r in range(len(gathered[0])):
            e = r * self.num_local_experts + local
            yield [(f"{pre}mlp.experts.{e}.{s}", g[r]) for s, g in zip(suffixes, gathered)]


def _pair_mla_down_projections(groups: Iterator[list[Named]]) -> Iterator[list[Named]]:
    """Hold each ``q_a_proj`` back until its layer's ``kv_a_proj_with_mqa`` and emit them as one group.

    SGLang fuses the two into ``fused_qkv_a_proj_with_mqa`` and caches the halves only within one
    ``load_weights`` call (deepseek_weight_loader.py): split across two buckets, the weight would
    silently never load.
    """
    held: dict[str, list[Named]] = {}
    for group in groups:
        names = [n for n, _ in group]
        q_a = [n for n in names if n.endswith("self_attn.q_a_proj.weight")]
        if q_a and len(group) == 1:
            held[q_a[0].replace("q_a_proj", "kv_a_proj_with_mqa")] = group
            continue
        for n in names:
            if n in held:
                group = held.pop(n) + group
        yield group
    if held:
        raise ValueError(f"HF export: q_a_proj without its kv_a_proj_with_mqa: {sorted(held)}")


def iter_hf_groups(model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype] = None):
    """The export as lists of (HF name, tensor) that must travel in one ``load_weights`` call."""
    return _pair_mla_down_projections(_Exporter(model, cfg, vocab_size, dtype).groups())


def export_hf(model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype] = None) -> Iterator[Named]:
    """Stream this rank's model as (Hugging Face name, tensor), whole tensors (TP / EP gathered).

    Collective when torch.distributed runs with TP or EP > 1: every rank must drain the iterator.
    ``vocab_size`` is the real vocab (the padded rows are dropped); ``dtype`` casts the floating tensors
    (except the float32 ``e_score_correction_bias``); None keeps the parameters' dtype.
    """
    for group in iter_hf_groups(model, cfg, vocab_size, dtype):
        yield from group


def iter_hf_buckets(
    model, cfg: ModelConfig, vocab_size: int, bucket_bytes: int = 512 << 20, dtype: Optional[torch.dtype] = None
) -> Iterator[list[Named]]:
    """:func:`export_hf` in buckets of about ``bucket_bytes`` (a bucket exceeds it only by one group)."""
    bucket: list[Named] = []
    size = 0
    for group in iter_hf_groups(model, cfg, vocab_size, dtype):
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += group
        size += nbytes
    if bucket:
        yield bucket
