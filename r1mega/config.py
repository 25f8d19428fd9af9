"""Typed configuration: one dataclass per concern, registered with Hydra's ConfigStore.

The YAML files under ``conf/`` only set values; the schema lives here, so a misspelled key or a
wrong type on the command line stops Hydra at once (OmegaConf struct mode), and the cross-field
rules that types cannot express are checked by :func:`validate` before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING  # noqa: F401  (re-exported for conf authors)


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


@dataclass
class ParallelConfig:
    """Megatron parallel layout. world = tp * pp * cp * dp; ep divides dp * cp * tp / etp."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = 1 for MoE (DeepSeek practice)
    sequence_parallel: Optional[bool] = None  # None = on whenever tp > 1 (required for MoE + TP)
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    backend: Optional[str] = None  # None = nccl on GPU, gloo on CPU


@dataclass
class AlgoConfig:
    """GRPO and its variants. Defaults are the paper-faithful R1-Zero objective."""

    group_size: int = 16  # G answers per prompt
    beta: float = 0.001  # k3 KL coefficient; 0 = no reference model
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    loss_agg: str = "seq-mean-token-mean"  # | token-mean (DAPO) | seq-mean-token-sum-norm (Dr.GRPO)
    adv_std_norm: bool = True  # Dr.GRPO: False
    ratio_level: str = "token"  # token | sequence (GSPO)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    num_minibatches: int = 1  # optimizer steps per rollout (R1-Zero: 16)
    ref_reset_every: int = 0  # replace the reference by the policy every N steps (R1-Zero: 400); 0 = never
    loss_impl: str = "auto"  # torch | triton | auto (triton on GPU, torch on CPU)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64


@dataclass
class RolloutConfig:
    backend: str = "megatron"  # megatron (in-process static engine) | sglang
    prompts_per_step: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_batch_size: int = 512  # sequences the engine decodes at once
    sglang_mem_fraction: float = 0.5


@dataclass
class RewardConfig:
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    timeout_s: float = 5.0  # hard per-sample limit; a timed-out sample scores 0 and is counted
    batch_timeout_s: Optional[float] = None  # cap on one step's verification (many pathological answers)
    num_workers: int = 2  # verifier processes per rank, started on the first non-integer answer
    think_in_prompt: bool = False  # the template ends with "<think>": the response starts inside it


@dataclass
class OptimConfig:
    lr: float = 3e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class SFTConfig:
    """Cold-start SFT on generated <think>/<answer> demonstrations (R1 stage 1); steps=0 skips it."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    num_examples: int = 2000


@dataclass
class DataConfig:
    task: str = "arithmetic"  # arithmetic (generated) | jsonl (a math data file)
    path: Optional[str] = None  # jsonl with question / answer fields (task=jsonl)
    eval_path: Optional[str] = None
    question_key: str = "question"
    answer_key: str = "answer"
    template: str = "r1_zero"  # r1_zero | compact (the tiny default) | chat
    max_prompt_len: int = 256
    # arithmetic task
    arith_min: int = 0
    arith_max: int = 99
    arith_ops: str = "+-"
    num_train: int = 20000
    num_eval: int = 200
    seed: int = 1


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    micro_batch_size: int = 64
    precision: str = "fp32"  # fp32 | bf16
    fp8: Optional[str] = None  # None | blockwise | tensorwise | delayed (TE only)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # 0 = only before and after RL
    eval_samples: int = 1  # sampled answers per eval prompt (pass@1 estimate), plus one greedy
    save_every: int = 0
    save_dir: Optional[str] = None
    resume: bool = True
    threads: int = 0  # torch intra-op threads per rank; 0 = leave as is
    max_minutes: float = 0.0  # stop RL after this wall time (0 = no limit)
    export_hf_dir: Optional[str] = None  # write a Hugging Face folder here at the end of the run (None = never)
    export_hf_every: int = 0  # also every N steps, into <export_hf_dir>-step_N (0 = only at the end)


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "r1mega"
    run_name: Optional[str] = None
    out_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    plot: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}; set {name} to one of them")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks Hydra's types cannot express. Raises ConfigError naming the field."""
    m, p, a, r = cfg.model, cfg.parallel, cfg.algo, cfg.rollout
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        _positive(f"model.{name}", getattr(m, name))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    _choice("model.normalization", m.normalization, ("RMSNorm", "LayerNorm"))
    _choice("model.activation", m.activation, ("swiglu", "gelu"))
    _choice("model.position_embedding_type", m.position_embedding_type, ("rope", "none"))
    if m.is_moe:
        _choice("model.moe_router_score_function", m.moe_router_score_function, ("sigmoid", "softmax"))
        _choice("model.moe_load_balancing_type", m.moe_load_balancing_type, ("none", "aux_loss", "seq_aux_loss"))
        _choice("model.moe_token_dispatcher_type", m.moe_token_dispatcher_type, ("alltoall", "allgather"))
        if not 0 < m.moe_router_topk <= m.num_experts:
            raise ConfigError(f"model.moe_router_topk={m.moe_router_topk} must be in [1, model.num_experts]")
        if m.num_experts % p.ep:
            raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}")
        if m.first_k_dense_layers >= m.num_layers:
            raise ConfigError("model.first_k_dense_layers must be < model.num_layers (else use a dense model)")
    elif p.ep > 1:
        raise ConfigError("parallel.ep > 1 needs an MoE model (model.num_experts > 0); set parallel.ep=1")
    for name in ("tp", "pp", "ep", "cp"):
        _positive(f"parallel.{name}", getattr(p, name))
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} not divisible by parallel.pp={p.pp}")
    if p.cp > 1:
        raise ConfigError(
            "parallel.cp > 1: context parallelism is not wired into the GRPO trainer yet (batches are not split "
            "across CP ranks); set parallel.cp=1 and use parallel.tp with sequence parallelism for long responses"
        )
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp={model_parallel}; "
            "change the parallel sizes or the number of processes"
        )
    etp = p.etp or 1
    if (world_size // p.pp) % (p.ep * etp):
        raise ConfigError(
            f"parallel.ep*etp={p.ep * etp} must divide world_size/pp={world_size // p.pp}; change parallel.ep"
        )
    _choice("algo.loss_agg", a.loss_agg, ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"))
    _choice("algo.ratio_level", a.ratio_level, ("token", "sequence"))
    _choice("algo.loss_impl", a.loss_impl, ("auto", "torch", "triton"))
    if a.group_size < 2:
        raise ConfigError(f"algo.group_size={a.group_size} must be >= 2: GRPO's baseline is the group mean")
    _positive("algo.beta", a.beta, allow_zero=True)
    _positive("algo.eps_low", a.eps_low, allow_zero=True)
    _positive("algo.eps_high", a.eps_high, allow_zero=True)
    if a.eps_low >= 1:
        raise ConfigError(f"algo.eps_low={a.eps_low} must be < 1 (the lower clip bound is 1 - eps_low)")
    _positive("algo.num_minibatches", a.num_minibatches)
    if r.prompts_per_step % a.num_minibatches:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by algo.num_minibatches="
            f"{a.num_minibatches}"
        )
    _choice("rollout.backend", r.backend, ("megatron", "sglang"))
    _positive("rollout.sampling.temperature", r.sampling.temperature)
    if not 0 < r.sampling.top_p <= 1:
        raise ConfigError(f"rollout.sampling.top_p={r.sampling.top_p} must be in (0, 1]")
    _positive("rollout.sampling.max_new_tokens", r.sampling.max_new_tokens)
    _positive("reward.timeout_s", cfg.reward.timeout_s)
    _positive("reward.num_workers", cfg.reward.num_workers)
    _positive("optim.lr", cfg.optim.lr)
    _choice("train.precision", cfg.train.precision, ("fp32", "bf16"))
    _choice("train.fp8", cfg.train.fp8, (None, "blockwise", "tensorwise", "delayed"))
    _choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    _choice("data.task", cfg.data.task, ("arithmetic", "jsonl"))
    _choice("data.template", cfg.data.template, ("r1_zero", "compact", "chat"))
    if cfg.data.task == "jsonl" and not cfg.data.path:
        raise ConfigError("data.task=jsonl needs data.path=<file.jsonl>")
    _choice("logging.wandb_mode", cfg.logging.wandb_mode, ("offline", "online", "disabled"))


def register_configs() -> None:
    """Register the schema so conf/*.yaml are typed: conf/config.yaml extends `base_config`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="algo", name="base_algo", node=AlgoConfig)
