"""Cold-start demonstrations in R1's format from GSM8K-style worked solutions (R1's stage 1), held out from RL.

A raw instruct model never writes R1's ``<think>/<answer>`` tags, so with the strict R1 rewards every group
scores 0 and GRPO has no signal (measured on SmolLM2-135M-Instruct, issue 12). A short SFT on worked solutions
in the format fixes that. GSM8K's ``answer`` field is such a solution: reasoning lines with calculator
annotations (``48/2 = <<48/2=24>>24``) and a last line ``#### 72``. :func:`r1_solution` rewrites it as
``<think>steps</think><answer>72</answer>``.

``sft.path`` names the file; :func:`split_cold_start` draws ``sft.num_examples`` of its rows (seeded by
``data.seed``, never one of the held-out eval questions) and removes their questions from the RL prompts, so
the policy is never rewarded on a problem whose solution it was taught. The split does not depend on
``sft.steps``: a resumed run (which skips the SFT) samples from the same RL prompts as its first attempt.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks.py imports r1_solution from here
    from r1mega.config import Config
    from r1mega.data.tasks import Problem

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: <<a*b=c>>


def r1_solution(worked: str) -> str | None:
    """``steps #### N`` -> ``<think>steps</think><answer>N</answer>``; None when there is no ``#### N``.

    The calculator annotations are removed (their result follows them in the text); thousands commas are
    dropped from N (the accuracy reward compares numbers, so ``1,000`` and ``1000`` score the same).
    """
    steps, sep, final = worked.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        return None
    steps = "\n".join(line.strip() for line in _CALCULATOR.sub("", steps).strip().splitlines())
    return f"<think>{steps}</think><answer>{final}</answer>"


def split_cold_start(train: list[Problem], eval_set: list[Problem], cfg: Config) -> tuple[list[Problem], list[Problem]]:
    """(RL prompts, SFT demonstrations). Without ``sft.path``: (train, train), the task's own solutions.

    With it: ``sft.num_examples`` rows of ``sft.path`` in R1 format (none of them an eval question), and the
    train problems whose question is not among them. Deterministic in ``data.seed``.
    """
    from r1mega.data.tasks import DataError, load_jsonl

    if not cfg.sft.path:
        return train, train
    held_out = {p.question for p in eval_set}
    rows = load_jsonl(cfg.sft.path, cfg.data.question_key, cfg.data.answer_key, solutions=True)
    candidates = [p for p in rows if p.question not in held_out]
    if not candidates:
        raise DataError(
            f"sft.path={cfg.sft.path}: all {len(rows)} rows are held-out eval questions; point sft.path at the "
            "train file (e.g. GSM8K's train.jsonl)"
        )
    rng = random.Random(cfg.data.seed)
    picked = sorted(rng.sample(range(len(candidates)), min(cfg.sft.num_examples, len(candidates))))
    demos = [candidates[i] for i in picked]
    taught = {p.question for p in demos}
    rl = [p for p in train if p.question not in taught]
    if not rl:
        raise DataError(
            f"sft.num_examples={cfg.sft.num_examples} demonstrations from {cfg.sft.path} cover every RL prompt of "
            f"data.path={cfg.data.path}; lower sft.num_examples (e.g. {max(1, len(train) // 2)})"
        )
    return rl, demos
