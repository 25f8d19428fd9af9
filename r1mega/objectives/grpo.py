"""The GRPO objective and its variants (DAPO, Dr.GRPO, GSPO are settings of it): where to change the loss.

- :class:`GRPOSettings`: the loss's knobs, built from ``algo.*`` by name (``algo=dapo`` etc. only set them).
- PyTorch path: :func:`r1mega.grpo.loss.grpo_loss`, the fp64-tested reference and home of the formulas.
- Kernel path: r1mega_kernels' fused Triton loss (:class:`GRPOKernel`); :meth:`GRPOKernel.supports` says
  which settings it implements, and :func:`choose_impl` runs any other variant on the PyTorch path and logs
  that it did. A change to the formulas in ``grpo/loss.py`` that the kernel does not make must be refused
  there too (``supports``), or the GPU would silently train another loss.
- One metrics schema (:data:`METRICS`) for both paths: :func:`r1mega.grpo.loss.metric_sums`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility

from r1mega.config import Config, ConfigError
from r1mega.grpo.logprobs import token_logprobs
from r1mega.grpo.loss import LossSettings, aggregation_weights, grpo_loss, metric_sums
from r1mega.objectives.base import MetricsSchema, Microbatch

log = logging.getLogger(__name__)

METRICS = MetricsSchema(
    {
        "kl": "train/kl",
        "clip_frac": "train/clip_frac",
        "entropy": "train/entropy",
        "ratio": "train/ratio_mean",
        "tis_weight": "train/tis_weight_mean",  # algo.tis only
        "tis_masked": "train/tis_masked_frac",
    }
)


@dataclass(frozen=True)
class GRPOSettings(LossSettings):
    temperature: float = 1.0  # the policy's log-prob temperature (= the sampling temperature unless set)
    impl: str = "auto"  # algo.loss_impl: torch | triton | auto

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOSettings:
        a = cfg.algo
        return cls(
            eps_low=a.eps_low,
            eps_high=a.eps_high,
            beta=a.beta,
            loss_agg=a.loss_agg,
            ratio_level=a.ratio_level,
            max_len=cfg.rollout.sampling.max_new_tokens,
            tis=a.tis,
            tis_cap=a.tis_cap,
            tis_seq_cap=a.tis_seq_cap,
            temperature=a.training_temperature(cfg.rollout.sampling),
            impl=a.loss_impl,
        )


class GRPOKernel:
    """r1mega_kernels' fused GRPO loss: log-softmax, clip, k3 KL and the gradient in one pass over the
    vocab-parallel logits (TP shards reduced inside), without materialising [b, t, V] fp32 log-probs."""

    @staticmethod
    def supports(s: GRPOSettings) -> tuple[bool, str]:
        if s.ratio_level != "token":
            return False, f"algo.ratio_level={s.ratio_level!r} (GSPO) needs a per-sequence reduction the kernel lacks"
        if s.tis != "none":
            return False, f"algo.tis={s.tis!r}: the kernel has no rollout-correction weight / sequence mask"
        return True, ""

    @staticmethod
    def available() -> bool:
        try:
            import r1mega_kernels
        except ImportError:
            return False
        return r1mega_kernels.available()

    def __call__(self, logits, targets, mb: Microbatch, ref, s: GRPOSettings):
        import r1mega_kernels  # Triton: imported only on this path

        tp_group = parallel_state.get_tensor_model_parallel_group()
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1],
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        u, denom = aggregation_weights(mb["mask"], s.loss_agg, s.max_len, seq_ids=mb.get("seq_ids"))
        # logits stay the [b, t, V] view of the model output (the last position sliced off): the kernels read it
        # through its strides (a reshape here would copy the whole logits); per-token inputs are [b, t].
        loss_sum, stats = r1mega_kernels.grpo_loss(
            logits,
            targets,
            mb["old_logp"],
            ref,
            mb["advantages"],
            u,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            beta=s.beta if ref is not None else 0.0,
            temperature=s.temperature,
            tp_group=tp_group if dist.get_world_size(tp_group) > 1 else None,
            vocab_start=vocab_start,
        )
        ratio = torch.exp(stats.logp - mb["old_logp"])
        return loss_sum, denom, metric_sums(mb["mask"], stats.is_clipped, stats.kl, ratio, stats.entropy)


def choose_impl(s: GRPOSettings, on_gpu: bool, kernels_available: bool) -> str:
    """``"kernel"`` or ``"torch"`` for these settings; logs when a variant the kernel lacks falls back."""
    if s.impl == "torch":
        return "torch"
    wanted = s.impl == "triton" or (on_gpu and kernels_available)
    ok, reason = GRPOKernel.supports(s)
    if not ok:
        if wanted:
            log.warning("GRPO loss on the PyTorch path, not the r1mega_kernels kernel: %s", reason)
        return "torch"
    if s.impl == "triton" and not kernels_available:
        raise ConfigError(
            "algo.loss_impl=triton needs Triton with a GPU (or TRITON_INTERPRET=1); set algo.loss_impl=torch"
        )
    return "kernel" if wanted else "torch"


class GRPOObjective:
    metrics = METRICS

    def __init__(self, settings: GRPOSettings, device: torch.device) -> None:
        self.settings = settings
        self.impl = choose_impl(settings, device.type == "cuda", GRPOKernel.available())
        self._kernel = GRPOKernel() if self.impl == "kernel" else None

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device) -> GRPOObjective:
        return cls(GRPOSettings.from_config(cfg), device)

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    def loss(self, mb: Microbatch, logits: torch.Tensor):
        s = self.settings
        targets, lg = mb["tokens"][:, 1:], logits[:, :-1]
        ref = mb.get("ref_logp") if s.beta > 0 else None
        if self._kernel is not None:
            return self._kernel(lg, targets, mb, ref, s)
        logp, ent = token_logprobs(lg, targets, s.temperature, with_entropy=True)
        return self.loss_from_logprobs(mb, logp, ent)

    def loss_from_logprobs(self, mb: Microbatch, logp: torch.Tensor, entropy: torch.Tensor):
        """The PyTorch loss from per-token log-probs [b, S-1] (the path ``train.fused_lm_head_train`` takes)."""
        s = self.settings
        ref = mb.get("ref_logp") if s.beta > 0 else None
        rollout = mb.get("rollout_logp") if s.tis != "none" else None
        loss_sum, denom, metrics = grpo_loss(
            logp, mb["old_logp"], ref, mb["advantages"], mb["mask"], s, rollout, seq_ids=mb.get("seq_ids")
        )  # seq_ids: packed microbatches (r1mega/packing.py) hold several answers per row
        metrics["entropy"] = (entropy.detach() * mb["mask"]).sum()
        return loss_sum, denom, metrics
