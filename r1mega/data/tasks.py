"""Prompts and gold answers: generated arithmetic (the embedded default) or a math jsonl file.

The R1-Zero template is the paper's (arXiv 2501.12948, Table 1); ``compact`` is a short template for
the tiny character-level default, whose context is a few dozen tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from r1mega.config import ConfigError, DataConfig
from r1mega.data.cold_start import r1_solution

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


class DataError(ConfigError):
    """A data file or the data split is unusable; the message names the file:line and the fix.

    A ``ConfigError`` so that ``r1mega-train`` reports it in one line (exit status 2), before the model is built.
    """


_ENCODING_FIX = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)"


def load_jsonl(path: str, question_key: str, answer_key: str, solutions: bool = False) -> list[Problem]:
    """Every row of a JSONL file as a Problem; any unusable row stops with ``path:line`` and the fix.
    ``solutions``: each answer is a GSM8K worked solution, kept in R1 format (r1mega.data.cold_start).

    Read as bytes and decoded per line, so an encoding error names its line and byte offset (a text-mode read
    raises a bare UnicodeDecodeError with a position in some internal buffer).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path={path!r} does not exist; point data.path at a .jsonl file")
    out = []
    offset = 0  # byte offset of the current line in the file
    with p.open("rb") as f:
        for ln, raw in enumerate(f, 1):
            line_start, offset = offset, offset + len(raw)
            if ln == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is harmless
                raw, line_start = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{ln}: byte 0x{raw[e.start]:02x} at file offset {line_start + e.start} (column "
                    f"{e.start + 1}) is not UTF-8; {_ENCODING_FIX}"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}:{e.colno}: invalid JSON ({e.msg}); fix or remove this line") from None
            out.append(_problem(row, path, ln, question_key, answer_key, solutions))
    if not out:
        raise DataError(f"{path} has no rows; point data.path / data.eval_path at a JSONL file with one row per line")
    return out


def _problem(row: object, path: str, ln: int, question_key: str, answer_key: str, solutions: bool = False) -> Problem:
    """One JSON row as a Problem. A missing or null field stops the run: ``str(None)`` would become the gold
    answer "None" and silently score every response 0."""
    if not isinstance(row, dict):
        raise DataError(f"{path}:{ln}: a row must be a JSON object, not {type(row).__name__}")
    for key, field_name in ((question_key, "data.question_key"), (answer_key, "data.answer_key")):
        if key not in row:
            raise DataError(
                f"{path}:{ln}: no {key!r} field (fields present: {sorted(row)}); set {field_name} to the right one"
            )
        value = row[key]
        if value is None or isinstance(value, (dict, list)) or not str(value).strip():
            raise DataError(
                f"{path}:{ln}: {key!r} is {json.dumps(value)[:80]}; it must be a non-empty string or number "
                "(fix or remove this row)"
            )
    ans = str(row[answer_key])
    if "####" in ans:  # GSM8K keeps the final answer after '#### '
        ans = ans.split("####")[-1].strip()
        if not ans:
            raise DataError(f"{path}:{ln}: {answer_key!r} has nothing after '####'; fix or remove this row")
    solution = r1_solution(str(row[answer_key])) if solutions else None
    if solutions and solution is None:
        raise DataError(f"{path}:{ln}: sft.path rows need a worked solution ending in '#### N' in {answer_key!r}")
    return Problem(str(row[question_key]), ans, solution or "")


def load_problems(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out eval) problems, checked: both non-empty, or a DataError naming the fields to change.

    The trainer calls this before it builds the model, so a bad file costs seconds, not a model build.
    Generated eval problems never appear in the train set.
    """
    if cfg.num_eval < 1:
        raise DataError(f"data.num_eval={cfg.num_eval} must be >= 1 (the held-out accuracy needs problems)")
    if cfg.task == "arithmetic":
        eval_set = arithmetic_problems(cfg, cfg.num_eval, cfg.seed + 1)
        held = {p.question for p in eval_set}
        train = [p for p in arithmetic_problems(cfg, cfg.num_train, cfg.seed) if p.question not in held]
        where = (
            f"data.num_train={cfg.num_train} generated problems (arith_min..arith_max={cfg.arith_min}..{cfg.arith_max})"
        )
        if not train:
            raise DataError(
                f"{where} leave no training problem once the {cfg.num_eval} held-out ones are removed; "
                "raise data.num_train or widen data.arith_min / data.arith_max"
            )
        return train, eval_set
    train = load_jsonl(cfg.path, cfg.question_key, cfg.answer_key)
    if cfg.eval_path:
        return train, load_jsonl(cfg.eval_path, cfg.question_key, cfg.answer_key)[: cfg.num_eval]
    if cfg.num_eval >= len(train):
        raise DataError(
            f"{cfg.path} has {len(train)} rows and data.num_eval={cfg.num_eval} of them are held out, leaving no "
            f"training row; set data.num_eval below {len(train)} (e.g. data.num_eval={max(1, len(train) // 10)}) "
            "or give a separate data.eval_path"
        )
    return train[cfg.num_eval :], train[: cfg.num_eval]
