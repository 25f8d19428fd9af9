"""The policy: a megatron-core GPTModel (dense, or DeepSeek-V3-style MoE, optionally MLA) from typed configs.

Transformer Engine layer specs are used when TE imports and a GPU is present (grouped GEMM, FP8); the
megatron-local spec otherwise. Two local-spec gaps are filled here (see :func:`_local_block_spec`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from r1mega.config import ModelConfig, ParallelConfig, TrainConfig
from r1mega.model.packed_attention import packed_local_attention


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp: int) -> int:
    """Pad the vocab so every TP rank holds an equal shard and matmuls stay aligned.

    Unlike Megatron-LM (multiple of divisible_by * tp) we pad to lcm(divisible_by, tp), so the same
    checkpoint loads under any TP size that divides the multiple (TP=1 and TP=2 share one shape).
    """
    multiple = math.lcm(model.make_vocab_size_divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def te_available(device: torch.device) -> bool:
    return device.type == "cuda" and _te_importable()


def transformer_config(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, on_gpu: bool):
    """Map our ModelConfig to megatron's TransformerConfig (MLATransformerConfig for MLA)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    bf16 = train.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    sp = parallel.sequence_parallel if parallel.sequence_parallel is not None else parallel.tp > 1
    kw = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=False,  # shared experts refuse biases; DeepSeek / Qwen3 use none
        add_qkv_bias=model.add_qkv_bias,  # Qwen2: biases on q/k/v only
        hidden_dropout=0.0,  # RL recomputes log-probs: dropout would make them disagree with rollout
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or 1,
        sequence_parallel=sp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=not on_gpu,
        # the GRPO loss returns (sum, denominator): megatron then normalises over all microbatches and
        # DP ranks exactly (token-mean over tokens, seq-mean over sequences) instead of averaging means.
        calculate_per_token_loss=True,
        attention_backend=AttnBackend.auto if on_gpu else AttnBackend.local,
        # activation recomputation (train.recompute_*): megatron checks the combination in its __post_init__
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers,
    )
    if model.is_moe:
        k = model.first_k_dense_layers
        kw.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_router_score_function=model.moe_router_score_function,
            moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_num_groups=model.moe_router_num_groups,
            moe_router_group_topk=model.moe_router_group_topk,
            moe_router_pre_softmax=model.moe_router_pre_softmax,
            moe_router_dtype=model.moe_router_dtype if on_gpu else None,
            moe_router_load_balancing_type=model.moe_load_balancing_type,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_token_dispatcher_type=model.moe_token_dispatcher_type,
            moe_grouped_gemm=model.moe_grouped_gemm and on_gpu and _te_importable(),  # TEGroupedMLP only
            moe_layer_freq=[0] * k + [1] * (model.num_layers - k) if k else 1,
        )
    if on_gpu and _te_importable() and train.te_fusions:  # the kernels megatron's own GPU recipes run with
        # RoPE: TE's kernel (per-sequence positions from cu_seqlens under THD, no host sync); megatron fuses MLA's
        # only for YaRN and only in training, so MLA keeps the unfused one
        kw.update(apply_rope_fusion=not model.multi_latent_attention)
        kw.update(bias_activation_fusion=model.activation == "swiglu")
        if model.is_moe:
            kw.update(moe_permute_fusion=True, moe_router_fusion=True)
    if train.fp8:
        # (not moe_router_padding_for_quantization: it pads the routing map in place, which the fused router's
        # backward has saved; TEGroupedMLP pads each expert's tokens to FP8's 16 itself)
        kw.update(fp8="e4m3", fp8_recipe=train.fp8)
    if model.multi_latent_attention:
        return MLATransformerConfig(
            **kw,
            q_lora_rank=model.q_lora_rank,
            kv_lora_rank=model.kv_lora_rank,
            qk_head_dim=model.qk_head_dim,
            qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
            v_head_dim=model.v_head_dim,
            rope_type=model.rope_type,
            rotary_base=model.rotary_base,
            rotary_scaling_factor=model.rotary_scaling_factor,
            original_max_position_embeddings=model.original_max_position_embeddings,
            beta_fast=model.beta_fast,
            beta_slow=model.beta_slow,
            mscale=model.mscale,
            mscale_all_dim=model.mscale_all_dim,
        )
    return TransformerConfig(**kw)


def _sp_torch_norm():
    """torch RMSNorm/LayerNorm usable with sequence parallelism.

    megatron's WrappedTorchNorm asserts ``not sequence_parallel`` (only TE/apex norms allow it), yet
    MoE + TP training requires SP. Marking the weights ``sequence_parallel`` makes
    finalize_model_grads all-reduce their grads over TP, as TE's norms do.
    """

    class SPTorchNorm:
        def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
            norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
            norm = norm_cls(hidden_size, eps=eps)
            for p in norm.parameters():
                p.sequence_parallel = config.sequence_parallel
            return norm

    return SPTorchNorm


def _mla_local_core_attention():
    """Local DotProductAttention that accepts MLA's ``k_channels``/``v_channels`` keyword arguments.

    megatron-core 0.16.1 pairs MLASelfAttention with the local DotProductAttention, which does not
    accept them (only TEDotProductAttention does); the output width is then heads * v_channels.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


def _replicated_linear():
    """megatron's replicated Linear, for MLA's down-projections in the local spec.

    With the local spec megatron builds MLA's q/kv down-projections as ColumnParallelLinear and
    all-gathers their output over TP; the backward of that gather only splits the gradient, so the
    rope key (used by every head) loses the other TP ranks' heads' gradient and the down-projection
    weights drift apart from a single-rank run (tests/test_parallel.py, MLA under TP=2). The TE spec
    uses a replicated ("duplicated") linear on the sequence-parallel input instead; this is its
    local twin (weights marked sequence_parallel, so finalize_model_grads all-reduces them over TP).
    """
    from megatron.core.post_training.modelopt.layers import Linear

    return Linear


def _without_te_fixes() -> None:
    """megatron-core 0.16.1 bugs that bite whenever Transformer Engine is absent (CPU, or a GPU without TE).

    The TE extension module still imports (its classes become MagicMocks), so MLA's
    ``try: from ...transformer_engine import TELinear`` succeeds and ``isinstance(x, TELinear)`` raises;
    and moe_utils binds ``te_general_gemm`` only when TE imports, yet the router reads it (NameError).
    """
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    if not te_ext.HAVE_TE:
        mla.HAVE_TE = False
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _local_block_spec(tcfg, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    block = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=use_te, normalization=tcfg.normalization)
    if use_te:
        return block
    _without_te_fixes()
    block = TransformerBlockSubmodules(layer_specs=list(block.layer_specs), layer_norm=block.layer_norm)
    # the local DotProductAttention refuses packed (THD) sequences: a block-diagonal reference (packing.py)
    core_attn = packed_local_attention(_mla_local_core_attention() if tcfg.multi_latent_attention else None)
    mla_attn = core_attn if tcfg.multi_latent_attention else None
    sp_norm = _sp_torch_norm() if tcfg.sequence_parallel else None
    for spec in block.layer_specs:
        sub = spec.submodules
        sub.self_attention.submodules.core_attention = core_attn
        if mla_attn is not None:
            attn = sub.self_attention.submodules
            attn.linear_q_down_proj = attn.linear_kv_down_proj = _replicated_linear()
        if sp_norm is not None:
            attn = sub.self_attention.submodules
            if mla_attn is not None and tcfg.qk_layernorm:  # MLA normalises its sequence-parallel latents
                attn.q_layernorm = attn.kv_layernorm = sp_norm
            elif tcfg.qk_layernorm:  # Qwen3's per-head q/k norms (replicated over TP like the layer norms)
                attn.q_layernorm = attn.k_layernorm = sp_norm
            sub.input_layernorm = sp_norm
            if getattr(sub.pre_mlp_layernorm, "__name__", "") != "IdentityOp":
                sub.pre_mlp_layernorm = sp_norm
    if sp_norm is not None:
        block.layer_norm = sp_norm
    return block


def build_gpt_model(
    model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, vocab_size: int, device: torch.device
):
    """Build this rank's stage of the policy (pre/post-process follow the pipeline position)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    on_gpu = device.type == "cuda"
    use_te = te_available(device)
    tcfg = transformer_config(model, parallel, train, on_gpu)
    gpt = GPTModel(
        config=tcfg,
        transformer_layer_spec=_local_block_spec(tcfg, use_te),
        vocab_size=padded_vocab_size(vocab_size, model, parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="none" if model.multi_latent_attention else model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=int(model.rotary_base),
    )
    _mark_expert_params(gpt)
    return gpt.to(device)


def _mark_expert_params(gpt) -> None:
    """Make DDP reduce every routed-expert gradient over the expert-data-parallel group.

    megatron-core 0.16.1 flags expert weights ``allreduce=False`` (expert buffers, reduced over the
    expert-DP group) only when EP > 1. With EP = 1 but ETP < TP (e.g. TP=2, ETP=1: each TP rank runs
    full expert copies on its own sequence shard) they land in the dense buffers, reduced over the dense
    DP group, which does not contain the other TP ranks: the expert copies silently diverge. Found by
    tests/test_parallel.py (TP=2 vs one rank).
    """
    for name, p in gpt.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False


def output_weight(gpt) -> torch.Tensor:
    """The LM head's weight [V/tp, H] (this rank's vocab shard; the embedding when tied)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_out(gpt):
    """Within: the last pipeline stage's GPTModel returns its final hidden states [b, s, H] instead of logits.

    megatron-core 0.16.1 has no switch for it, so the output layer's forward is swapped for the identity (with
    the input region the ColumnParallelLinear would apply: the sequence-parallel all-gather, or without it the
    copy to the TP region). For the fused linear + log-prob paths; their backward (train.fused_lm_head_train)
    returns each TP rank's share of the hidden-state gradient, which that region's backward sums (reduce-scatter /
    all-reduce), as the real layer's does.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    layer = getattr(gpt, "output_layer", None)
    if layer is None or not gpt.post_process:
        yield
        return

    def forward(hidden, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden), None
        return copy_to_tensor_model_parallel_region(hidden), None  # identity forward; all-reduce of grads over TP

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
