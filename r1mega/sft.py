"""Cold-start SFT on worked <think>/<answer> demonstrations (R1's first stage), before RL.

The loss is :class:`r1mega.objectives.sft.SFTObjective`; this module builds its batches and runs the steps.
"""

from __future__ import annotations

import random

import torch
from megatron.core import parallel_state

from r1mega.batch import TokenBatch, pad_rows
from r1mega.config import Config
from r1mega.data.tasks import Problem, encode_prompt
from r1mega.engine import MegatronEngine
from r1mega.objectives.sft import SFTObjective


def demonstration_batch(problems: list[Problem], tokenizer, template: str, multiple: int) -> TokenBatch:
    """Prompt + worked solution + EOS; the loss sees only the solution tokens."""
    rows, spans = [], []
    for p in problems:
        prompt = encode_prompt(tokenizer, p.question, template)
        response = tokenizer.encode(p.solution) + [tokenizer.eos_id]
        rows.append(prompt + response)
        spans.append((len(prompt), len(response)))
    tokens = pad_rows(rows, tokenizer.pad_id, multiple)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for i, (p, n) in enumerate(spans):
        mask[i, p - 1 : p - 1 + n] = 1.0
    return TokenBatch(tokens=tokens, mask=mask)


def cold_start_sft(cfg: Config, policy: MegatronEngine, problems: list[Problem], tokenizer, log=None) -> list[float]:
    """``cfg.sft.steps`` optimizer steps of cross-entropy on demonstrations; returns the loss per step."""
    demos = [p for p in problems if p.solution][: cfg.sft.num_examples]
    if cfg.sft.steps <= 0:
        return []
    if not demos:
        raise ValueError("sft.steps > 0 but the task has no worked solutions; set sft.steps=0")
    objective = SFTObjective.from_config(cfg, policy.device)
    rng = random.Random(cfg.train.seed + parallel_state.get_data_parallel_rank())  # each DP rank its own examples
    losses = []
    for step in range(cfg.sft.steps):
        batch = demonstration_batch(
            rng.sample(demos, min(cfg.sft.batch_size, len(demos))), tokenizer, cfg.data.template, policy.seq_multiple
        )
        m = policy.forward_backward(batch, objective, cfg.sft.lr)
        losses.append(m["loss"])
        if log is not None:
            log(step, m)
    return losses
