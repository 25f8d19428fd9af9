"""The token batch every forward pass takes: rows of prompt + response, and per-target-token tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Prompt + response token rows, right-padded, and per-target-token tensors."""

    tokens: torch.Tensor  # [B, S] int64
    mask: torch.Tensor  # [B, S-1] 1.0 on response tokens (the ones the loss sees)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None  # the rollout engine's log-probs (NaN where unknown): algo.tis
    routed_experts: torch.Tensor | None = None  # [B, S, layers, topk] int: the rollout's experts (routing replay)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor) -> TokenBatch:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TokenBatch(**{n: pick(getattr(self, n)) for n in FIELDS})

    def fields(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, by name (what a microbatch carries to the objective)."""
        return {n: getattr(self, n) for n in FIELDS if getattr(self, n) is not None}


FIELDS = ("tokens", "mask", "old_logp", "ref_logp", "advantages", "rollout_logp", "routed_experts")


def pad_rows(rows: list[list[int]], pad_id: int, multiple: int = 1) -> torch.Tensor:
    """Right-pad token rows into [B, S], S rounded up to ``multiple`` (sequence parallelism splits S)."""
    s = max(len(r) for r in rows)
    s = -(-s // multiple) * multiple
    out = torch.full((len(rows), s), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
