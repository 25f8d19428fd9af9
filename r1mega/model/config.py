"""``ModelConfig``: the ``model`` section of the typed config (r1mega.config), next to the code it shapes.

Each field is a megatron-core TransformerConfig knob or a weight source (``checkpoint``, ``hf_path``); a HF
folder's ``config.json`` fills the architecture fields through the family modules (r1mega/model/families/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from r1mega.config_checks import ConfigError, _check, _in_range

Normalization = Literal["RMSNorm", "LayerNorm"]
Activation = Literal["swiglu", "gelu"]
PositionEmbedding = Literal["rope", "none"]
RopeType = Literal["rope", "yarn"]
RouterScore = Literal["sigmoid", "softmax"]
LoadBalancing = Literal["none", "aux_loss", "seq_aux_loss"]
Dispatcher = Literal["alltoall", "allgather"]
RouterDtype = Literal[None, "fp32", "fp64"]


@dataclass
class ModelConfig:
    """Shapes of a megatron-core GPTModel: dense, or DeepSeek-V3-style MoE, optionally with MLA."""

    name: str = "tiny_moe"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None = MHA
    kv_channels: Optional[int] = None  # head dim; None = hidden / heads
    ffn_hidden_size: int = 256  # dense FFN width (dense models and the first dense layers of MoE)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    make_vocab_size_divisible_by: int = 64  # padded vocab is a multiple of this x TP (as Megatron-LM)
    max_position_embeddings: int = 512
    position_embedding_type: str = "rope"  # rope | none (MLA carries its own rope)
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = False
    add_qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2 / Qwen2.5)
    activation: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    # --- Mixture of Experts (num_experts None or 0 = dense) ---
    num_experts: Optional[int] = 8
    moe_ffn_hidden_size: int = 64
    moe_router_topk: int = 2
    moe_shared_expert_intermediate_size: Optional[int] = 64
    moe_router_score_function: str = "sigmoid"  # sigmoid (DeepSeek-V3) | softmax
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing (DeepSeek-V3)
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: Optional[float] = None  # DeepSeek-V3: 2.5
    moe_router_num_groups: Optional[int] = None  # node-limited routing (DeepSeek-V3: 8)
    moe_router_group_topk: Optional[int] = None  # (DeepSeek-V3: 4)
    moe_router_pre_softmax: bool = False
    moe_router_dtype: Optional[str] = None  # fp32 router on GPU (recommended for sigmoid + bias)
    moe_load_balancing_type: str = "none"  # none | aux_loss | seq_aux_loss
    moe_aux_loss_coeff: float = 0.0
    first_k_dense_layers: int = 0  # DeepSeek-V3: 3 dense layers before the MoE layers
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    moe_grouped_gemm: bool = True  # TE GroupedMLP on GPU; ignored by the local (CPU) spec
    # --- Multi-head Latent Attention ---
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: str = "rope"  # rope | yarn
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # --- tokenizer / weights ---
    tokenizer: str = "char"  # char (the built-in arithmetic tokenizer) | path of a HF tokenizer
    checkpoint: Optional[str] = None  # megatron dist checkpoint to start from
    # a Hugging Face model folder (config.json + safetensors + tokenizer): its config.json replaces the
    # architecture fields above, its weights are loaded at any TP/PP/EP layout, and tokenizer defaults to it
    hf_path: Optional[str] = None
    # > 0: turn a dense hf_path model into a DeepSeek-V3-style MoE with this many routed experts (copies of
    # the dense MLP, sigmoid router + expert bias, top-k = moe_router_topk) that computes the dense function
    upcycle_experts: int = 0
    upcycle_shared_expert: bool = True  # upcycling: the dense MLP is the shared expert, routed copies start at 0

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    def __post_init__(self) -> None:
        _check(
            self,
            "model",
            positive="num_layers hidden_size num_attention_heads num_query_groups kv_channels ffn_hidden_size "
            "make_vocab_size_divisible_by max_position_embeddings rotary_base norm_epsilon moe_ffn_hidden_size "
            "moe_router_topk moe_router_topk_scaling_factor moe_router_num_groups moe_router_group_topk q_lora_rank "
            "kv_lora_rank qk_head_dim v_head_dim rotary_scaling_factor original_max_position_embeddings",
            nonneg="vocab_size init_method_std num_experts moe_shared_expert_intermediate_size moe_aux_loss_coeff "
            "moe_router_bias_update_rate first_k_dense_layers qk_pos_emb_head_dim beta_fast beta_slow mscale "
            "mscale_all_dim",
            choices={
                "normalization": Normalization, "activation": Activation, "rope_type": RopeType,
                "position_embedding_type": PositionEmbedding, "moe_router_score_function": RouterScore,
                "moe_load_balancing_type": LoadBalancing, "moe_token_dispatcher_type": Dispatcher,
                "moe_router_dtype": RouterDtype,
            },
        )  # fmt: skip
        _in_range(self, "model", "rotary_percent", "(0, 1]")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.is_moe and self.moe_router_topk > self.num_experts:
            raise ConfigError(f"model.moe_router_topk={self.moe_router_topk} must be in [1, model.num_experts]")
        if self.is_moe and self.first_k_dense_layers >= self.num_layers:
            raise ConfigError("model.first_k_dense_layers must be < model.num_layers (else use a dense model)")
