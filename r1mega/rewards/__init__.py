"""Rule-based rewards of DeepSeek-R1-Zero: answer accuracy (exact numbers, then math-verify) + <think>/<answer> format.

Usage: ``with RewardScorer(cfg.reward) as scorer: batch = scorer.score(responses, golds)``; ``batch.total`` is
``accuracy_weight * batch.accuracy + format_weight * batch.format`` per sample, and ``batch.num_timeouts`` /
``batch.num_errors`` count samples whose verification was cut off or crashed (they score accuracy 0).
"""

from .format import format_reward
from .math import accuracy_reward, extract_answer, extract_boxed, fast_equivalent, is_equivalent
from .scorer import DEFAULT_VERIFY_FN, RewardBatch, RewardScorer

__all__ = [
    "DEFAULT_VERIFY_FN",
    "RewardBatch",
    "RewardScorer",
    "accuracy_reward",
    "extract_answer",
    "extract_boxed",
    "fast_equivalent",
    "format_reward",
    "is_equivalent",
]
