"""Prompts and gold answers: generated arithmetic (the embedded default) or a math jsonl file.

The R1-Zero template is the paper's (arXiv 2501.12948, Table 1); ``compact`` is a short template for
the tiny character-level default, whose context is a few dozen tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from r1mega.config import DataConfig

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str = ""  # a worked <think>..</think><answer>..</answer> demonstration, when one exists


def render_prompt(question: str, template: str) -> str:
    if template == "r1_zero":
        return R1_ZERO_TEMPLATE.format(question=question)
    if template == "compact":
        return f"{question}=?"
    return question  # chat: the tokenizer's chat template is applied by encode_prompt


def encode_prompt(tokenizer, question: str, template: str) -> list[int]:
    """The prompt's token ids: the rendered template, or (``chat``) the tokenizer's own chat template
    around one user turn, ending with the assistant's generation prompt."""
    if template == "chat":
        return tokenizer.encode_chat(question)
    return tokenizer.encode(render_prompt(question, template))


def _scratchpad(a: int, b: int, op: str) -> str:
    """Column-wise working for addition (what a person writes), the expression otherwise."""
    if op != "+":
        return f"{a}{op}{b}"
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return ",".join(steps)


def arithmetic_problems(cfg: DataConfig, n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(cfg.arith_min, cfg.arith_max), rng.randint(cfg.arith_min, cfg.arith_max)
        op = rng.choice(cfg.arith_ops)
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = f"{a}{op}{b}"
        out.append(Problem(q, str(val), f"<think>{_scratchpad(a, b, op)}</think><answer>{val}</answer>"))
    return out


def load_jsonl(path: str, question_key: str, answer_key: str) -> list[Problem]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.path={path!r} does not exist; point data.path at a .jsonl file")
    out = []
    with p.open() as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if question_key not in row or answer_key not in row:
                raise KeyError(
                    f"{path}:{ln} has no {question_key!r}/{answer_key!r}; set data.question_key / data.answer_key "
                    f"(fields present: {sorted(row)})"
                )
            ans = str(row[answer_key])
            if "####" in ans:  # GSM8K keeps the final answer after '#### '
                ans = ans.split("####")[-1].strip()
            out.append(Problem(str(row[question_key]), ans))
    return out


def load_problems(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out eval) problems. Generated eval problems never appear in the train set."""
    if cfg.task == "arithmetic":
        eval_set = arithmetic_problems(cfg, cfg.num_eval, cfg.seed + 1)
        held = {p.question for p in eval_set}
        train = [p for p in arithmetic_problems(cfg, cfg.num_train, cfg.seed) if p.question not in held]
        return train, eval_set
    train = load_jsonl(cfg.path, cfg.question_key, cfg.answer_key)
    if cfg.eval_path:
        eval_set = load_jsonl(cfg.eval_path, cfg.question_key, cfg.answer_key)
    else:
        eval_set, train = train[: cfg.num_eval], train[cfg.num_eval :]
    return train, eval_set[: cfg.num_eval]
