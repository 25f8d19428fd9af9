"""The rollout-engine interface: what the trainer needs from any generation backend.

Backends: :mod:`r1mega.rollout.megatron_engine` (megatron-core's inference engine in-process, sharing
the trainer's weights) and SGLang (colocated server; weights pushed in memory after each update); any other
registers in :data:`r1mega.registry.ROLLOUT_ENGINES`. The surface mirrors what SGLang offers (token-id
prompts, per-token log-probs, in-memory weight updates, memory release / resume), so all plug into the same
trainer, built by one constructor (:meth:`RolloutEngine.from_config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from r1mega.config import Config, ModelConfig
from r1mega.model.hf_export import iter_hf_buckets


class NonFiniteError(RuntimeError):
    """Generation cannot sample: the policy weights or the logits are non-finite (the message names which);
    raised instead of torch.multinomial's "probability tensor contains either inf, nan or element < 0"."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k; greedy is top_k=1
    max_new_tokens: int = 64
    seed: Optional[int] = None
    # per-token log-probs in Rollout.logprobs (the trainer's |dlogp| and TIS need them); evaluation asks for none
    # (NaN), which spares SGLang a log-softmax and a Python list entry per generated token
    logprobs: bool = True

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


@dataclass
class Rollout:
    """One generated answer. ``response_ids`` end with the EOS token when the answer finished."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # log pi_rollout(token) per response token (NaN where the engine reports none)
    finished: bool
    # MoE, rollout.routing_replay: [prompt + response - 1 tokens, num_layers, topk] (r1mega/routing_replay.py)
    routed_experts: Optional[torch.Tensor] = field(default=None, repr=False)


class WeightSource(Protocol):
    """The trainer's weights as a stream of (Hugging Face name, tensor) pairs: what an engine loads.

    Engines never see the model. The stream comes in buckets of about ``bucket_bytes``; tensors that must
    be loaded in one call (a layer's MLA ``q_a_proj`` + ``kv_a_proj_with_mqa``) share a bucket. Drawing it is
    collective over the TP / EP groups (whole tensors are gathered): every rank must drain it.
    """

    vocab_size: int  # the real vocab (the policy's padded rows are not exported)

    def hf_buckets(
        self, bucket_bytes: int, dtype: Optional[torch.dtype] = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]: ...


@dataclass
class HFWeights:
    """The WeightSource of a megatron GPTModel, through :mod:`r1mega.model.hf_export`."""

    model: Any  # the unwrapped GPTModel (the in-process megatron engine generates with it directly)
    model_cfg: ModelConfig
    vocab_size: int

    def hf_buckets(
        self, bucket_bytes: int, dtype: Optional[torch.dtype] = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return iter_hf_buckets(self.model, self.model_cfg, self.vocab_size, bucket_bytes, dtype)


class RolloutEngine(Protocol):
    """A generation backend; register it in r1mega.registry.ROLLOUT_ENGINES (or ``rollout.backend=module:Class``).

    Contract (tests/test_rollout_contract.py runs it on every registered engine): ``release_memory`` and
    ``resume_memory`` are idempotent; ``update_weights`` may come while memory is released; ``generate`` after
    ``resume_memory`` always uses the weights of the last ``update_weights`` (or of construction).
    """

    settings_type: type  # its RolloutConfig subclass (its config group, conf/rollout/<name>.yaml)

    @classmethod
    def from_config(cls, cfg: Config, weights: WeightSource, tokenizer) -> RolloutEngine:
        """The one constructor the trainer calls: settings from ``cfg.rollout``; weights only as a stream."""
        ...

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """One Rollout per prompt, in order (repeat a prompt G times for a group)."""
        ...

    def update_weights(self, source: WeightSource) -> None:
        """Make the next generate() use the trainer's current weights (collective: every rank calls it)."""
        ...

    def release_memory(self) -> None:
        """Free generation memory (KV cache, weights copy) while the trainer runs."""
        ...

    def resume_memory(self) -> None: ...

    def shutdown(self) -> None: ...
