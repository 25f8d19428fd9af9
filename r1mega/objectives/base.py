"""What the megatron engine needs from a training objective, and how its metrics reach the log.

An objective is one file (see :mod:`r1mega.objectives.grpo`): a typed settings dataclass built from the
config by name, ``loss(microbatch, logits)`` in PyTorch (plus, where one exists, a kernel path chosen by an
explicit ``supports(settings)``), and one :class:`MetricsSchema`. Register it in
:data:`r1mega.registry.LOSSES`, or point ``algo.loss`` at ``module:Class``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

Microbatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MetricsSchema:
    """How the per-microbatch metric sums of an objective become the step's log lines (defined once).

    ``token_means`` maps a metric sum to its logged name; it is divided by the step's loss tokens (the
    objective's ``tokens`` sum). ``train/loss`` and ``train/grad_norm`` are means over optimizer steps;
    ``train/skipped`` is the fraction of optimizer steps that had no loss token on any rank.
    """

    token_means: dict[str, str] = field(default_factory=dict)

    def summarize(self, steps: list[dict[str, float]]) -> dict[str, float]:
        done = [m for m in steps if not m.get("skipped")]
        out = {"train/skipped": 1.0 - len(done) / max(len(steps), 1)}
        if not done:
            return out
        total = {k: sum(m.get(k, 0.0) for m in done) for k in done[0]}
        tokens = max(total.get("tokens", 0.0), 1.0)
        out["train/loss"] = total["loss"] / len(done)
        out["train/grad_norm"] = total["grad_norm"] / len(done)
        out.update({name: total[k] / tokens for k, name in self.token_means.items() if k in total})
        return out


class Objective(Protocol):
    """A loss the engine can run under any parallel layout."""

    metrics: MetricsSchema
    temperature: float  # the log-prob temperature: old / reference log-probs are computed with it too

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Objective: ...

    def loss(self, mb: Microbatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss sum, denominator, metric sums) of one microbatch; the loss is sum / denominator after the
        engine sums both over microbatches and data-parallel ranks. ``logits`` [b, S, V/tp] (vocab-parallel);
        ``mb`` holds ``tokens`` [b, S], ``mask`` [b, S-1] and the batch's other per-token tensors. Packed
        microbatches (``train.max_tokens_per_microbatch``) are one row [1, T] of several answers, with
        ``seq_ids`` [1, T-1] naming each target token's answer: aggregate per answer by it (r1mega.grpo.loss)."""
        ...

    # Optional: ``loss_from_logprobs(mb, logp, entropy)`` -> the same triple from per-token log-probs and entropy
    # [b, S-1] (at ``temperature``, differentiable). An objective that has it can train without [T, V] logits
    # (``train.fused_lm_head_train``, r1mega/grpo/fused_lm_head.py).
