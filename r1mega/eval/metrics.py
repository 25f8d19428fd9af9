"""The numbers R1 reports: pass@1 over k samples, unbiased pass@k', and cons@k (majority vote).

Definitions (DeepSeek-R1, arXiv 2501.12948, sec. 3.1; Chen et al. 2021, "Evaluating Large Language Models
Trained on Code", sec. 2.1):

* pass@1 of a problem = c / n, the mean correctness of its n sampled answers; of a set = the mean over problems.
* pass@k (k <= n) = 1 - C(n-c, k) / C(n, k): the probability that at least one of k answers drawn without
  replacement from the n is correct. Unbiased for the pass@k of k fresh samples, with lower variance than
  sampling exactly k. Computed as a product (Codex's form): binomials of n = 64 overflow floats' exactness.
* cons@k = correctness of the majority answer of the k samples. Answers are grouped by the project's answer
  equivalence (``r1mega.rewards.math.is_equivalent``), not by string: ``\\frac{1}{2}`` and ``0.5`` are one vote.
  Two answers are one vote when the equivalence holds in either direction (``is_equivalent`` treats its second
  argument as the reference, and an integer reference refuses ``\\frac{4}{2}`` -- right for rewards, where it
  blocks echoing the question, but two model answers that are the same number are one vote). Each new answer
  joins the first cluster (in order of first occurrence) whose first member it matches. Missing answers (no
  ``<answer>`` / ``\\boxed{}``) never vote. Ties go to the tied cluster that occurs first in sample order, so the
  result is a pure function of the samples' order. The vote is correct iff the winning cluster's first member
  was scored correct against the gold answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from r1mega.rewards.math import is_equivalent

Equivalence = Callable[[str, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every k-subset contains a correct answer
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no large binomials, no cancellation
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_pass_at(k: int) -> list[int]:
    """1, 2, 4, ... below k, and k itself: the columns R1-style tables show."""
    out, p = [], 1
    while p < k:
        out.append(p)
        p *= 2
    return out + [k]


@dataclass
class Vote:
    """One cluster of equivalent answers: its first member's text and sample index, and its size."""

    answer: str
    first: int
    count: int
    correct: bool = False


def symmetric(equivalent: Equivalence) -> Equivalence:
    """``equivalent`` in either direction (see the module docstring for why)."""
    return lambda a, b: a == b or bool(equivalent(a, b)) or bool(equivalent(b, a))


def cluster_answers(answers: Sequence[str | None], same: Equivalence) -> list[Vote]:
    """Group answers into votes in order of first occurrence; ``None`` (no answer) is skipped.

    ``same(answer, representative)`` decides membership (pass a symmetric relation, e.g. :func:`symmetric`);
    identical strings are compared once (the cache), so k equal answers cost one call.
    """
    votes: list[Vote] = []
    memo: dict[str, int] = {}  # answer text -> index into votes
    for i, a in enumerate(answers):
        if a is None:
            continue
        j = memo.get(a)
        if j is None:
            j = next((v for v, vote in enumerate(votes) if same(a, vote.answer)), None)
            if j is None:
                votes.append(Vote(a, i, 0))
                j = len(votes) - 1
            memo[a] = j
        votes[j].count += 1
    return votes


def majority(votes: Sequence[Vote]) -> Vote | None:
    """The largest cluster; ties -> the one whose first member comes first. None when nobody answered."""
    if not votes:
        return None
    return min(votes, key=lambda v: (-v.count, v.first))


def cons_at_k(
    answers: Sequence[str | None], correct: Sequence[bool], equivalent: Equivalence = is_equivalent
) -> tuple[bool, Vote | None, list[Vote]]:
    """(vote correct, winning vote, all votes) for one problem's answers and their per-sample correctness."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    votes = cluster_answers(answers, symmetric(equivalent))
    for v in votes:
        v.correct = bool(correct[v.first])
    win = majority(votes)
    return (win is not None and win.correct), win, votes


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def standard_error(xs: Sequence[float]) -> float:
    """Standard error of the mean over problems (sample std / sqrt(n)): the noise of a set's pass@1."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
