"""Group-relative advantages: the group of G answers to one prompt is its own baseline (no critic)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from r1mega.config import AlgoConfig


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean(group)) / std(group)  (GRPO);  R_i - mean(group) when ``std_norm`` is off (Dr.GRPO).

    ``rewards`` is [num_prompts * group_size], groups contiguous. The std is the unbiased sample std
    (DeepSeekMath / TRL). A group whose rewards are all equal has zero advantage: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of algo.group_size={group_size}")
    r = rewards.double().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [num_prompts]: groups whose rewards are not all equal (DAPO's dynamic-sampling filter)."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > 0


# An advantage estimator (``algo.advantage``, see r1mega.registry.ADVANTAGES): per-answer rewards
# [num_prompts * group_size], groups contiguous, and the algo config -> per-answer advantages.
AdvantageFn = Callable[[torch.Tensor, "AlgoConfig"], torch.Tensor]


def grpo_advantages(rewards: torch.Tensor, algo: AlgoConfig) -> torch.Tensor:
    """GRPO's group-normalised advantage (Dr.GRPO: ``algo.adv_std_norm=false``)."""
    return group_advantages(rewards, algo.group_size, std_norm=algo.adv_std_norm)
