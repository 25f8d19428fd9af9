"""Cold-start SFT on worked <think>/<answer> demonstrations (R1's first stage), before RL."""

from __future__ import annotations

import random

from r1mega.config import Config
from r1mega.data.tasks import Problem, render_prompt
from r1mega.policy import Policy, TokenBatch, pad_rows


def demonstration_batch(problems: list[Problem], tokenizer, template: str, multiple: int) -> TokenBatch:
    """Prompt + worked solution + EOS; the loss sees only the solution tokens."""
    import torch

    rows, spans = [], []
    for p in problems:
        prompt = tokenizer.encode(render_prompt(p.question, template))
        response = tokenizer.encode(p.solution) + [tokenizer.eos_id]
        rows.append(prompt + response)
        spans.append((len(prompt), len(response)))
    tokens = pad_rows(rows, tokenizer.pad_id, multiple)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for i, (p, n) in enumerate(spans):
        mask[i, p - 1 : p - 1 + n] = 1.0
    return TokenBatch(tokens=tokens, mask=mask)


def cold_start_sft(cfg: Config, policy: Policy, problems: list[Problem], tokenizer, log=None) -> list[float]:
    """``cfg.sft.steps`` optimizer steps of cross-entropy on demonstrations; returns the loss per step."""
    demos = [p for p in problems if p.solution][: cfg.sft.num_examples]
    if cfg.sft.steps <= 0:
        return []
    if not demos:
        raise ValueError("sft.steps > 0 but the task has no worked solutions; set sft.steps=0")
    from megatron.core import parallel_state

    rng = random.Random(cfg.train.seed + parallel_state.get_data_parallel_rank())  # each DP rank its own examples
    multiple = cfg.parallel.tp if policy.model.config.sequence_parallel else 1
    losses = []
    for step in range(cfg.sft.steps):
        batch = demonstration_batch(
            rng.sample(demos, min(cfg.sft.batch_size, len(demos))), tokenizer, cfg.data.template, multiple
        )
        m = policy.sft_minibatch(batch, cfg.sft.lr)
        losses.append(m["loss"])
        if log is not None:
            log(step, m)
    return losses
