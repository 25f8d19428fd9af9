"""R1 format reward: ``<think> reasoning </think> <answer> answer </answer>`` and nothing else."""

from __future__ import annotations

import re

__all__ = ["format_reward"]

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\A\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)


def format_reward(response: str, *, think_in_prompt: bool = False) -> float:
    """1.0 iff ``response`` is exactly ``<think> ... </think> <answer> ... </answer>``, else 0.0.

    ``response`` is the completion after the prompt; the R1-Zero template ends with ``Assistant:``, so the
    completion itself opens with ``<think>``. Whitespace is allowed around and between the blocks; each tag must
    occur exactly once, in order; the answer must be non-empty (the reasoning may be empty); no text may follow
    ``</answer>``. Strip EOS/pad tokens before calling. ``think_in_prompt=True`` is for templates whose prompt
    already ends with ``<think>``: the completion then starts inside the reasoning (a leading ``<think>`` in the
    completion is still tolerated).
    """
    if not response:
        return 0.0
    if think_in_prompt and not response.lstrip().startswith("<think>"):
        response = "<think>" + response
    if any(response.count(tag) != 1 for tag in _TAGS):
        return 0.0
    m = _FORMAT_RE.match(response)
    if m is None or not m.group("answer").strip():
        return 0.0
    return 1.0
