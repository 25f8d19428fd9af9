"""Typed configuration: one dataclass per concern, registered with Hydra's ConfigStore.

The YAML files under ``conf/`` only set values; the schema lives here, so a misspelled key or a wrong type
on the command line stops Hydra at once (OmegaConf struct mode; ``+`` keys, which bypass it, are refused by
:func:`config_from_hydra`). Each dataclass checks its own fields in ``__post_init__``, next to them (choices
are the ``Literal`` types above each class), as megatron's TransformerConfig does; :func:`validate` keeps only
the rules across sections and against the world size (both in :mod:`r1mega.config_checks`). Errors are
:class:`ConfigError`, naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from r1mega.config_checks import _check, _in_range, _plugin
from r1mega.eval.config import EvalConfig
from r1mega.model.config import ModelConfig

# isort: split
from r1mega.config_checks import ConfigError, config_from_hydra, register_configs, validate  # noqa: F401 (re-exported)

Backend = Literal[None, "nccl", "gloo"]


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

    def __post_init__(self) -> None:
        _check(self, "parallel", positive="tp pp ep cp etp", choices={"backend": Backend})
        if self.cp > 1:
            raise ConfigError(
                "parallel.cp > 1: context parallelism is not wired into the GRPO trainer yet (batches are not split "
                "across CP ranks); set parallel.cp=1 and use parallel.tp with sequence parallelism for long responses"
            )


LossAgg = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
RatioLevel = Literal["token", "sequence"]
LossImpl = Literal["auto", "torch", "triton"]
TIS = Literal["none", "token", "seq_mask", "token+seq_mask"]
DynamicSampling = Literal["none", "mask", "resample"]


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
    dynamic_sampling: str = "none"  # DAPO, for groups of equal rewards: none | mask (no loss) | resample (regenerate)
    max_sample_rounds: int = 4  # resample: generation rounds per step at most (the first included)
    num_minibatches: int = 1  # optimizer steps per rollout (R1-Zero: 16)
    ref_reset_every: int = 0  # replace the reference by the policy every N steps (R1-Zero: 400); 0 = never
    loss_impl: str = "auto"  # torch | triton | auto (triton on GPU, torch on CPU)
    loss: str = "grpo"  # the objective: a name in r1mega.registry.LOSSES or "module:Class"
    advantage: str = "grpo"  # the advantage estimator: a name in r1mega.registry.ADVANTAGES or "module:fn"
    temperature: Optional[float] = None  # the log-prob temperature of the loss; None = rollout.sampling.temperature
    # rollout correction (r1mega/grpo/loss.py): none | token (TIS) | seq_mask (geometric-mean mask) | token+seq_mask
    tis: str = "none"
    tis_cap: float = 2.0  # TIS: per-token weight min(pi_old / pi_rollout, tis_cap), on the policy-gradient term
    tis_seq_cap: float = 2.0  # seq_mask: answers whose geometric-mean ratio leaves [1/cap, cap] leave the loss

    def training_temperature(self, sampling: SamplingConfig) -> float:
        """The temperature the loss's log-probs use: the sampling one unless ``algo.temperature`` is set."""
        return sampling.temperature if self.temperature is None else self.temperature

    def __post_init__(self) -> None:
        if str(self.dynamic_sampling).lower() in ("true", "false"):  # the field's former bool form
            self.dynamic_sampling = "mask" if str(self.dynamic_sampling).lower() == "true" else "none"
        _check(
            self,
            "algo",
            positive="num_minibatches temperature tis_cap max_sample_rounds",
            nonneg="beta eps_low eps_high ref_reset_every",
            choices={"loss_agg": LossAgg, "ratio_level": RatioLevel, "loss_impl": LossImpl, "tis": TIS},
        )
        if self.tis_seq_cap <= 1:
            raise ConfigError(f"algo.tis_seq_cap={self.tis_seq_cap} must be > 1 (the kept band is [1/cap, cap])")
        _check(self, "algo", choices={"dynamic_sampling": DynamicSampling})
        if self.group_size < 2:
            raise ConfigError(f"algo.group_size={self.group_size} must be >= 2: GRPO's baseline is the group mean")
        if self.eps_low >= 1:
            raise ConfigError(f"algo.eps_low={self.eps_low} must be < 1 (the lower clip bound is 1 - eps_low)")
        _plugin("algo", "loss", self.loss, "LOSSES")
        _plugin("algo", "advantage", self.advantage, "ADVANTAGES")


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _check(self, "rollout.sampling", positive="temperature max_new_tokens", nonneg="top_k")
        _in_range(self, "rollout.sampling", "top_p", "(0, 1]")


@dataclass
class RolloutConfig:
    """What every rollout engine takes. Each engine's own settings are a subclass in its config group:
    ``rollout=megatron`` (the default, conf/rollout/megatron.yaml) or ``rollout=sglang``."""

    backend: str = "megatron"  # a name in r1mega.registry.ROLLOUT_ENGINES or "module:Class"
    prompts_per_step: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_batch_size: int = 512  # sequences the engine decodes at once
    max_logp_gap: Optional[float] = None  # stop when a step's mean |logp_rollout - logp_trainer| exceeds it; None = off
    routing_replay: bool = False  # MoE: replay the rollout's experts in every trainer forward (megatron RouterReplay)

    def __post_init__(self) -> None:
        _check(self, "rollout", positive="prompts_per_step max_batch_size max_logp_gap")
        _plugin("rollout", "backend", self.backend, "ROLLOUT_ENGINES")


@dataclass
class MegatronRolloutConfig(RolloutConfig):
    """megatron-core's static inference engine, in-process on the trainer's own weights."""

    backend: str = "megatron"
    max_seq_len: Optional[int] = None  # KV-cache length; None = data.max_prompt_len + sampling.max_new_tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "rollout", positive="max_seq_len")


SGLangSampling = Literal["pytorch", "flashinfer"]


@dataclass
class SGLangRolloutConfig(RolloutConfig):
    """SGLang colocated on the trainer's GPUs (r1mega/rollout/sglang_engine.py; GPU only, experimental)."""

    backend: str = "sglang"
    mem_fraction: float = 0.5  # SGLang's mem_fraction_static: GPU memory for its weights + KV cache
    # passed to SGLang (which checks it): triton, since the carried sglang_kernel wheel has no FA3 kernels
    attention_backend: str = "triton"
    sampling_backend: str = "pytorch"
    disable_cuda_graph: bool = False  # CUDA graphs on (the first probe ran them off)
    # sglang 0.5.17 also captures ~58 prefill graphs (4..8192 tokens) at start: 50-100 s on the H200 for a 135M
    # model (docs/perf/sglang.md), for little gain on RL prefills; decode graphs stay on
    disable_prefill_cuda_graph: bool = True
    cuda_graph_max_bs: Optional[int] = None  # largest decode batch run as a CUDA graph (cuda_graph_max_bs_decode);
    # None = SGLang's own choice (256 on the H200), above it a decode step runs eagerly
    # the decode batch sizes captured as CUDA graphs (cuda_graph_bs_decode; a batch between two runs padded to the
    # next): None = SGLang's list up to cuda_graph_max_bs, 68 sizes at 1024, each captured at every engine start
    # (~150 s of the H200 eval's start-up on 2026-12-03); a short list such as [1,2,4,...,512,768,1024] starts faster
    cuda_graph_bs: Optional[list[int]] = None
    chunked_prefill_size: Optional[int] = None  # SGLang's chunked_prefill_size; None = its default, -1 = off
    # enable_deterministic_inference: honours the per-request sampling seeds; batch-invariant kernels (the triton
    # decode attention in fixed 256-token KV splits, log-probs through F.log_softmax)
    deterministic: bool = False
    bucket_mb: int = 512  # weight push: MiB per update_weights_from_tensor call (one dtype per bucket)
    flattened_bucket: bool = True  # push as FlattenedTensorBucket (load_format="flattened_bucket"), else tensor lists
    # read a sample of the pushed tensors back after the first push, then every N-th (0 = the first only): each read
    # costs ~2 s (16 get_weights_by_name calls; 30 % of a SmolLM2 step on the H200 when done every push)
    verify_push_every: int = 0
    base_port: int = 30000  # engine ports: base_port + 100 * first GPU of the TP group
    # any other sglang.Engine / ServerArgs field, applied last (SGLang checks the names):
    #   +rollout.server_args.triton_attention_num_kv_splits=16   (the '+' adds a key to this free-form dict)
    server_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self,
            "rollout",
            positive="bucket_mb base_port cuda_graph_max_bs",
            nonneg="verify_push_every",
            choices={"sampling_backend": SGLangSampling},
        )
        _in_range(self, "rollout", "mem_fraction", "(0, 1)")
        if self.cuda_graph_bs is not None:
            if not self.cuda_graph_bs or any(int(b) < 1 for b in self.cuda_graph_bs):
                raise ConfigError(f"rollout.cuda_graph_bs={list(self.cuda_graph_bs)}: give positive batch sizes")
            if self.cuda_graph_max_bs is not None:
                raise ConfigError(
                    "rollout.cuda_graph_bs and rollout.cuda_graph_max_bs are both set: the list's largest size is the "
                    "max; drop rollout.cuda_graph_max_bs"
                )


@dataclass
class RewardConfig:
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    timeout_s: float = 5.0  # hard per-sample limit; a timed-out sample scores 0 and is counted
    # cap on one step's verification: answers still unverified then score 0 and count as reward/timeouts.
    # Without it, 16 distinct pathological answers cost 16 x timeout_s + restarts (89 s on one worker). None = no cap
    batch_timeout_s: Optional[float] = 20.0
    num_workers: int = 2  # verifier processes per rank, started on the first non-integer answer
    think_in_prompt: bool = False  # the template ends with "<think>": the response starts inside it

    def __post_init__(self) -> None:
        _check(self, "reward", positive="timeout_s batch_timeout_s num_workers", nonneg="accuracy_weight format_weight")


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
    cpu_offload: bool = False  # megatron's optimizer_cpu_offload (HybridDeviceOptimizer; distributed optimizer)
    offload_fraction: float = 1.0  # with cpu_offload: the fraction of optimizer states kept on the CPU

    def __post_init__(self) -> None:
        _check(self, "optim", positive="lr adam_eps", nonneg="min_lr warmup_steps weight_decay clip_grad")
        _in_range(self, "optim", "offload_fraction", "[0, 1]")
        _in_range(self, "optim", "adam_beta1", "[0, 1)")
        _in_range(self, "optim", "adam_beta2", "[0, 1)")


@dataclass
class SFTConfig:
    """Cold-start SFT on worked <think>/<answer> demonstrations (R1 stage 1); steps=0 skips it."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    num_examples: int = 2000
    # a JSONL of GSM8K-style worked solutions (data.answer_key = steps + '#### N'), rewritten in R1 format; its
    # num_examples demonstrations are removed from the RL prompts (r1mega/data/cold_start.py). None = the task's own
    path: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self, "sft", positive="lr batch_size num_examples", nonneg="steps")


Task = Literal["arithmetic", "jsonl"]
Template = Literal["r1_zero", "compact", "chat"]


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

    def __post_init__(self) -> None:
        _check(
            self,
            "data",
            positive="max_prompt_len num_train",
            nonneg="num_eval",
            choices={"task": Task, "template": Template},
        )
        if self.task == "jsonl" and not self.path:
            raise ConfigError("data.task=jsonl needs data.path=<file.jsonl>")
        if self.task == "arithmetic" and (not self.arith_ops or set(self.arith_ops) - set("+-*")):
            raise ConfigError(f"data.arith_ops={self.arith_ops!r} must be a non-empty string of + - *")
        if self.arith_max < self.arith_min:
            raise ConfigError(f"data.arith_max={self.arith_max} must be >= data.arith_min={self.arith_min}")


Precision = Literal["fp32", "bf16"]
FP8 = Literal[None, "blockwise", "tensorwise", "delayed"]
Device = Literal["auto", "cpu", "cuda"]
Recompute = Literal[None, "selective", "full"]
RecomputeMethod = Literal[None, "uniform", "block"]


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    micro_batch_size: int = 64
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer_during_rollout: bool = False  # optimizer state to host + grad buffers freed while generating
    fp32_lm_head: bool = False  # output layer (logits, log-probs, loss) in fp32 from bf16; SGLang's enable_fp32_lm_head
    fp8: Optional[str] = None  # None | blockwise | tensorwise | delayed (TE only)
    # GPU + TE: megatron's fused kernels (MoE permute / unpermute, router top-k + scores, SwiGLU, RoPE); off = unfused
    te_fusions: bool = True
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # 0 = only before and after RL
    eval_samples: int = 1  # sampled answers per eval prompt (pass@1 estimate), plus one greedy
    save_every: int = 0
    save_dir: Optional[str] = None  # None = <logging.out_dir>/checkpoints: every run keeps its trained model
    keep_last: int = 0  # keep only the newest N checkpoints in save_dir, older ones are deleted (0 = keep all)
    resume: bool = True
    threads: int = 0  # torch intra-op threads per rank; 0 = leave as is
    max_minutes: float = 0.0  # stop RL after this wall time (0 = no limit)
    export_hf_dir: Optional[str] = None  # write a Hugging Face folder here at the end of the run (None = never)
    export_hf_every: int = 0  # also every N steps, into <export_hf_dir>-step_N (0 = only at the end)
    # sequence packing (THD, r1mega/packing.py): microbatches of about this many tokens; 0 = padded row microbatches
    max_tokens_per_microbatch: Optional[int] = 0
    fused_lm_head: bool = False  # log-prob passes: fused linear + log-prob kernel on GPU, no [T, V] logits
    # the training pass too: chunked linear + log-prob with its own backward (r1mega/grpo/fused_lm_head.py), no
    # [T, V] logits or gradient; one more T*H*V matmul; needs an objective with loss_from_logprobs (GRPO, SFT)
    fused_lm_head_train: bool = False
    recompute_granularity: Optional[str] = None  # megatron activation recompute: None | selective | full
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only: layers per chunk (uniform) / recomputed (block)
    max_bad_steps: int = 3  # stop (exit 1) after this many steps in a row skipped as non-finite (0 = never stop)
    eval_before_on_resume: bool = False  # a resumed run skips the "before RL" evaluation unless this is set

    def __post_init__(self) -> None:
        _check(
            self,
            "train",
            positive="micro_batch_size eval_samples",
            nonneg="steps eval_every save_every threads max_minutes max_tokens_per_microbatch max_bad_steps",
            choices={"precision": Precision, "fp8": FP8, "device": Device, "recompute_granularity": Recompute,
                     "recompute_method": RecomputeMethod},
        )  # fmt: skip
        if self.recompute_granularity == "full" and (self.recompute_method is None or not self.recompute_num_layers):
            raise ConfigError("train.recompute_granularity=full needs train.recompute_method and recompute_num_layers")


WandbMode = Literal["offline", "online", "disabled"]


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "r1mega"
    run_name: Optional[str] = None
    out_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self, "logging", choices={"wandb_mode": WandbMode})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=MegatronRolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
