"""A loss variant as a user writes one: this file plus ``algo.loss=tests.example_loss:UnclippedPG``.

Plain importance-weighted policy gradient, token-mean, without the clip and the KL: -mean_t(A * pi/pi_old).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.grpo.logprobs import token_logprobs
from r1mega.objectives.base import MetricsSchema


@dataclass(frozen=True)
class UnclippedPGSettings:
    temperature: float

    @classmethod
    def from_config(cls, cfg) -> UnclippedPGSettings:
        return cls(temperature=cfg.algo.training_temperature(cfg.rollout.sampling))


class UnclippedPG:
    metrics = MetricsSchema({"ratio": "train/ratio_mean"})

    def __init__(self, settings: UnclippedPGSettings) -> None:
        self.settings = settings
        self.temperature = settings.temperature

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> UnclippedPG:
        return cls(UnclippedPGSettings.from_config(cfg))

    def loss(self, mb, logits):
        logp, _ = token_logprobs(logits[:, :-1], mb["tokens"][:, 1:], self.temperature)
        m = mb["mask"]
        ratio = torch.exp(logp - mb["old_logp"])
        loss_sum = -(mb["advantages"] * ratio * m).sum()
        return loss_sum, m.sum(), {"tokens": m.sum(), "ratio": (ratio.detach() * m).sum()}
