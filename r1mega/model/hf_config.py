"""Hugging Face ``config.json`` -> our :class:`~r1mega.config.ModelConfig`.

One function, :func:`model_config_from_hf`, for the architectures r1mega can build faithfully with
megatron-core: DeepSeek-V2 / V3 (MLA + DeepSeekMoE; Moonlight is a DeepseekV3ForCausalLM), Qwen3-MoE,
and the dense Qwen3 / Llama. Anything the megatron model would silently compute differently from the
Hugging Face one raises a ValueError naming the field, instead of producing a plausible wrong model.

Deliberately ignored (not part of the policy's forward pass): ``num_nextn_predict_layers`` (DeepSeek-V3's
multi-token-prediction head, a pre-training auxiliary the RL policy neither needs nor loads),
``quantization_config`` (the storage format of the published weights, not the architecture), token ids,
dropout, ``ep_size`` / ``pretraining_tp`` (the authors' parallel layout) and the auxiliary-loss settings
(``aux_loss_alpha``, ``seq_aux``, ``router_aux_loss_coef``: training choices, set in our config).
"""

from __future__ import annotations

from typing import Any

from r1mega.config import ModelConfig

DEEPSEEK_ARCHS = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
QWEN3_MOE_ARCHS = ("Qwen3MoeForCausalLM",)
DENSE_ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ARCHS = DEEPSEEK_ARCHS + QWEN3_MOE_ARCHS + DENSE_ARCHS


def model_config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """Build the ModelConfig of a Hugging Face ``config.json`` (already parsed into a dict).

    Only the architecture is taken from ``hf``; the tokenizer, the checkpoint and the training knobs
    (load balancing, dispatcher, grouped GEMM) keep ModelConfig's defaults. Keys starting with ``_``
    (e.g. a fixture's ``_source``) are ignored. Raises ValueError naming the unsupported architecture
    or field.
    """
    arch = _architecture(hf)
    kw = _common(hf, arch)
    if arch in DEEPSEEK_ARCHS:
        kw.update(_deepseek_attention(hf))
        kw.update(_deepseek_moe(hf, arch))
    elif arch in QWEN3_MOE_ARCHS:
        kw.update(_gqa_attention(hf, arch))
        kw.update(_qwen3_moe(hf))
    else:
        kw.update(_gqa_attention(hf, arch))
        kw["num_experts"] = None  # dense
    return ModelConfig(name=name, **kw)


# ---------------------------------------------------------------------------------------- helpers


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"config.json 'architectures'={archs!r}: expected exactly one of {list(SUPPORTED_ARCHS)}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported architecture {arch!r} (config.json 'architectures'); supported: {list(SUPPORTED_ARCHS)}"
        )
    return arch


def _require(hf: dict[str, Any], key: str, arch: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{arch} config.json has no {key!r}, which the architecture needs")
    return hf[key]


def _common(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Fields every supported architecture shares: a pre-norm RMSNorm decoder with a SwiGLU MLP."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported: the MLP is SwiGLU (hidden_act 'silu') only")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true is not supported: r1mega builds its linear layers without biases")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported: attention is full causal attention")
    theta, scaling = _rope(hf)
    if scaling is not None and arch not in DEEPSEEK_ARCHS:
        kind = scaling.get("rope_type") or scaling.get("type")
        raise ValueError(
            f"rope_scaling of type {kind!r} is not supported for {arch}: ModelConfig has no field for it "
            "(only the YaRN scaling of MLA models is)"
        )
    return dict(
        num_layers=_require(hf, "num_hidden_layers", arch),
        hidden_size=_require(hf, "hidden_size", arch),
        num_attention_heads=_require(hf, "num_attention_heads", arch),
        # the dense FFN width; for MoE models only the first_k_dense_layers use it (the experts use
        # moe_intermediate_size)
        ffn_hidden_size=_require(hf, "intermediate_size", arch),
        vocab_size=_require(hf, "vocab_size", arch),
        max_position_embeddings=_require(hf, "max_position_embeddings", arch),
        rotary_base=float(theta),
        norm_epsilon=float(_require(hf, "rms_norm_eps", arch)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None). Reads both ``rope_theta`` + ``rope_scaling`` and the
    transformers-5 ``rope_parameters`` (which carries the theta and the scaling in one dict)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params or None
    theta = hf.get("rope_theta")
    if theta is None:
        theta = (scaling or {}).get("rope_theta", 10000.0)
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


def _gqa_attention(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Standard rotary attention with grouped KV heads (Qwen3, Qwen3-MoE, Llama)."""
    if arch == "Qwen2ForCausalLM":
        # Qwen2 hard-codes bias=True on its q/k/v projections (config.json has no switch for it)
        raise ValueError(
            "Qwen2ForCausalLM has q/k/v projection biases, which ModelConfig cannot express "
            "(it needs an add_qkv_bias field); not supported"
        )
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(
        # None = megatron's default (MHA / hidden // heads), so MHA models compare equal either way
        num_query_groups=kv_heads if kv_heads != heads else None,
        # Qwen3 decouples the head dim from hidden / heads (Qwen3-30B-A3B: 128, not 2048 / 32 = 64)
        kv_channels=head_dim if head_dim != hf["hidden_size"] // heads else None,
        # Qwen3's q_norm / k_norm are RMSNorms over each head's dim, which is megatron's qk_layernorm
        qk_layernorm=arch.startswith("Qwen3"),
        position_embedding_type="rope",
    )


def _deepseek_attention(hf: dict[str, Any]) -> dict[str, Any]:
    """Multi-head Latent Attention.

    Naming: DeepSeek splits each query/key head into a position-free part (``qk_nope_head_dim``) and
    a rotary part (``qk_rope_head_dim``); megatron calls them ``qk_head_dim`` and ``qk_pos_emb_head_dim``
    (so megatron's qk_head_dim is NOT the full q/k head width, which is their sum: 192 for V3).
    ``v_head_dim`` is the value head width, which also sets the output projection's input
    (heads * v_head_dim). ``q_lora_rank`` null (V2-Lite, Moonlight) means a direct query projection.
    DeepSeek always normalises the compressed latents (``kv_a_layernorm``, and ``q_a_layernorm`` when
    q is compressed); megatron builds those norms (q_layernorm / kv_layernorm) only with qk_layernorm,
    so it must be on. ``num_key_value_heads`` is meaningless for MLA (every head has its own K/V
    decompressed from the shared latent) and is ignored.
    """
    arch = hf["architectures"][0]
    kw: dict[str, Any] = dict(
        multi_latent_attention=True,
        qk_layernorm=True,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=_require(hf, "kv_lora_rank", arch),
        qk_head_dim=_require(hf, "qk_nope_head_dim", arch),
        qk_pos_emb_head_dim=_require(hf, "qk_rope_head_dim", arch),
        v_head_dim=_require(hf, "v_head_dim", arch),
    )
    _, scaling = _rope(hf)
    if scaling is None:
        kw["rope_type"] = "rope"
        return kw
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported for MLA (only 'yarn', or none)")
    # YaRN as DeepSeek implements it: frequencies interpolated between beta_fast / beta_slow by
    # `factor` over the original context; cos/sin are scaled by mscale(factor, mscale) /
    # mscale(factor, mscale_all_dim) and the softmax scale by mscale(factor, mscale_all_dim)^2
    # (mscale(s, m) = 0.1 * m * ln(s) + 1). megatron's YarnRotaryEmbedding + MLA softmax_scale do the
    # same with these fields; the defaults are those of DeepSeek's modeling code.
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


def _deepseek_moe(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """DeepSeekMoE: fine-grained routed experts + always-on shared experts after k dense layers.

    ``intermediate_size`` is the dense FFN of the first ``first_k_dense_replace`` layers;
    ``moe_intermediate_size`` is the width of ONE expert. The ``n_shared_experts`` shared experts are
    run as one MLP of width n_shared_experts * moe_intermediate_size (megatron's
    moe_shared_expert_intermediate_size): the sum of k SwiGLU MLPs equals one k-times wider one.
    """
    v3 = arch == "DeepseekV3ForCausalLM"
    experts = hf.get("n_routed_experts")
    if not experts:
        raise ValueError(f"{arch} config.json has no n_routed_experts: dense DeepSeek models are not supported")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"moe_layer_freq={hf['moe_layer_freq']} is not supported: only 1 (every layer after the dense)"
        )
    width = _require(hf, "moe_intermediate_size", arch)
    topk = _require(hf, "num_experts_per_tok", arch)
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
        # megatron ranks a group by the sum of its top (topk // group_topk) scores; DeepSeek-V3's
        # noaux_tc by the sum of its top-2, DeepSeek-V2's group_limited_greedy by its maximum
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
        # noaux_tc = aux-loss-free balancing: a per-expert bias (e_score_correction_bias) added to the
        # scores for the top-k choice only
        moe_router_enable_expert_bias=method == "noaux_tc",
        # softmax + norm_topk_prob=false (V2-Lite): softmax over all experts, then top-k, unnormalised;
        # norm_topk_prob=true: the softmax of the top-k logits (= the renormalised top-k probabilities)
        moe_router_pre_softmax=score == "softmax" and not norm_topk,
        moe_router_topk_scaling_factor=scaling if scaling != 1.0 else None,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=group_topk if groups > 1 else None,
        # DeepSeek computes the gate in fp32; sigmoid scores + a small bias need it (GPU only)
        moe_router_dtype="fp32" if score == "sigmoid" else None,
        first_k_dense_layers=hf.get("first_k_dense_replace", 0),
    )


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: softmax top-k routing, no shared expert, MoE in every layer by default."""
    arch = "Qwen3MoeForCausalLM"
    layers = hf["num_hidden_layers"]
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported: only 1")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))) or len(dense) >= layers:
        raise ValueError(
            f"mlp_only_layers={dense} is not supported: dense layers must be the first k (first_k_dense_layers)"
        )
    norm_topk = bool(hf.get("norm_topk_prob", False))
    return dict(
        num_experts=_require(hf, "num_experts", arch),
        moe_ffn_hidden_size=_require(hf, "moe_intermediate_size", arch),
        moe_router_topk=_require(hf, "num_experts_per_tok", arch),
        moe_shared_expert_intermediate_size=None,
        moe_router_score_function="softmax",
        moe_router_enable_expert_bias=False,
        moe_router_pre_softmax=not norm_topk,
        moe_router_topk_scaling_factor=None,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        first_k_dense_layers=len(dense),
    )
