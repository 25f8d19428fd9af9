"""Evaluation sets: the five shipped with the package (``r1mega/eval/data/``), a user's own JSONL, or the
training config's held-out problems.

Every row must be a JSON object with the question and answer fields; anything else stops with ``file:line``
and the fix, before a model is built. GSM8K's answer is its worked solution: the gold answer is the text after
``#### ``. Numeric answers stored as JSON numbers (AMC 23's ``27.0``) become strings; equivalence compares them
as numbers, so ``27.0`` matches ``27`` and AIME's ``"025"`` matches ``25``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r1mega.config import ConfigError, DataConfig, EvalConfig
from r1mega.data.tasks import Problem

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class SetSpec:
    """Where a shipped set lives and which fields hold its question and gold answer."""

    file: str
    question_key: str
    answer_key: str


SHIPPED: dict[str, SetSpec] = {
    "gsm8k": SetSpec("gsm8k.jsonl", "question", "answer"),
    "math500": SetSpec("math500.jsonl", "problem", "answer"),
    "aime24": SetSpec("aime24.jsonl", "problem", "answer"),
    "aime25": SetSpec("aime25.jsonl", "problem", "answer"),
    "amc23": SetSpec("amc23.jsonl", "problem", "answer"),
}
HELDOUT = "heldout"  # the training config's held-out problems (data.task / data.eval_path / data.num_eval)


class DatasetError(ValueError):
    """A data file or row is unusable; the message names ``file:line`` and the fix."""


def _gold(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC 23 stores whole-number answers as JSON floats
    text = str(value)
    if "####" in text:  # GSM8K: the worked solution ends with '#### <answer>'
        text = text.split("####")[-1]
    return text.strip()


def read_jsonl(path: str | Path, question_key: str, answer_key: str) -> list[Problem]:
    """Problems of a JSONL file (blank lines skipped). A malformed row raises DatasetError naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: no such file; eval.sets takes {sorted(SHIPPED)}, {HELDOUT!r} or a .jsonl path")
    out: list[Problem] = []
    with p.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"{p}:{ln}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the row"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(f"{p}:{ln}: a row must be a JSON object, got {type(row).__name__}")
            missing = [k for k in (question_key, answer_key) if k not in row]
            if missing:
                raise DatasetError(
                    f"{p}:{ln}: no field {missing[0]!r} (fields: {sorted(row)}); set eval.question_key / "
                    "eval.answer_key to this file's field names"
                )
            question, answer = row[question_key], row[answer_key]
            if not isinstance(question, str) or not question.strip():
                raise DatasetError(f"{p}:{ln}: field {question_key!r} must be a non-empty string")
            if answer is None or isinstance(answer, (dict, list, bool)) or not _gold(answer):
                raise DatasetError(f"{p}:{ln}: field {answer_key!r} must be a non-empty string or number")
            out.append(Problem(question, _gold(answer)))
    if not out:
        raise DatasetError(f"{p}: no rows")
    return out


def set_name(entry: str) -> str:
    """The name a set is reported under: shipped names as they are, files by their stem."""
    return entry if entry in SHIPPED or entry == HELDOUT else Path(entry).stem


def load_set(entry: str, question_key: str = "question", answer_key: str = "answer") -> list[Problem]:
    """One shipped set by name, or a user's .jsonl file with the given field names."""
    spec = SHIPPED.get(entry)
    if spec is not None:
        return read_jsonl(DATA_DIR / spec.file, spec.question_key, spec.answer_key)
    if entry.endswith(".jsonl") or Path(entry).is_file():
        return read_jsonl(entry, question_key, answer_key)
    raise ConfigError(f"eval.sets: unknown set {entry!r}; use one of {sorted(SHIPPED)}, {HELDOUT!r} or a .jsonl path")


def load_eval_sets(ecfg: EvalConfig, data: DataConfig | None = None) -> dict[str, list[Problem]]:
    """``{name: problems}`` for ``eval.sets`` in order, each cut to ``eval.limit`` problems."""
    out: dict[str, list[Problem]] = {}
    for entry in ecfg.sets:
        name = set_name(entry)
        if name in out:
            raise ConfigError(f"eval.sets names {name!r} twice; list each set once")
        if entry == HELDOUT:
            if data is None:
                raise ConfigError(f"eval.sets: {HELDOUT!r} needs the training data config")
            from r1mega.data.tasks import load_problems

            problems = load_problems(data)[1]
        else:
            problems = load_set(entry, ecfg.question_key, ecfg.answer_key)
        out[name] = problems[: ecfg.limit] if ecfg.limit else problems
    return out
