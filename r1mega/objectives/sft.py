"""Cold-start SFT's objective: token-mean cross-entropy on the response (demonstration) tokens.

No kernel path: SFT runs a few hundred steps before RL and its cost is the model's forward / backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.config import Config
from r1mega.grpo.logprobs import token_logprobs
from r1mega.objectives.base import MetricsSchema, Microbatch


@dataclass(frozen=True)
class SFTSettings:
    temperature: float = 1.0  # cross-entropy of the model's own distribution

    @classmethod
    def from_config(cls, cfg: Config) -> SFTSettings:
        return cls()


class SFTObjective:
    metrics = MetricsSchema()  # the loss (and the grad norm) only

    def __init__(self, settings: SFTSettings) -> None:
        self.settings = settings

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | None = None) -> SFTObjective:
        return cls(SFTSettings.from_config(cfg))

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    def loss(self, mb: Microbatch, logits: torch.Tensor):
        logp, _ = token_logprobs(logits[:, :-1], mb["tokens"][:, 1:], self.temperature)
        return self.loss_from_logprobs(mb, logp, None)

    def loss_from_logprobs(self, mb: Microbatch, logp: torch.Tensor, entropy: torch.Tensor | None):
        m = mb["mask"]
        return -(logp * m).sum(), m.sum(), {}
