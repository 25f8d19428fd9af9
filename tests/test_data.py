"""Data loading: every unusable file or split stops with file:line and the fix, before the model is built;
the prompt sampler picks exactly the problems the original per-prompt-shuffle implementation picked."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.config import ConfigError, DataConfig
from r1mega.data.tasks import DataError, Problem, load_problems

GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")


def _real_rows(n: int) -> list[str]:
    """The first n lines of the shared GSM8K test file (real rows, GSM8K's '#### answer' layout)."""
    with GSM8K.open(encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


def _jsonl(tmp_path: Path, lines: list[str] | bytes, name: str = "d.jsonl") -> str:
    p = tmp_path / name
    text = lines if isinstance(lines, bytes) else "".join(x.rstrip("\n") + "\n" for x in lines).encode()
    p.write_bytes(text)
    return str(p)


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(task="jsonl", path=path, **kw)


def test_real_rows_load_and_split():
    rows = _real_rows(12)
    cfg = _cfg(str(GSM8K), num_eval=3)
    train, held = load_problems(cfg)
    assert held == [Problem(json.loads(r)["question"], json.loads(r)["answer"].split("#### ")[-1]) for r in rows[:3]]
    assert train[0].question == json.loads(rows[3])["question"] and held[0].answer == "18"
    assert len(train) + len(held) == sum(1 for _ in GSM8K.open())


def test_bad_json_names_the_file_line(tmp_path):
    rows = _real_rows(4)
    rows[2] = rows[2][:40]  # line 3 cut short
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path}:3:\d+: invalid JSON"):
        load_problems(_cfg(path, num_eval=1))


def test_non_utf8_byte_names_line_and_offset(tmp_path):
    rows = [r.encode() for r in _real_rows(3)]
    bad = rows[1].replace(b"Janet", b"J\xe9net").replace(b"robe", b"r\xe9be")  # latin-1 e-acute
    data = rows[0] + bad + rows[2]
    path = _jsonl(tmp_path, data)
    col = bad.index(b"\xe9")
    with pytest.raises(DataError) as e:
        load_problems(_cfg(path, num_eval=1))
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: byte 0xe9 at file offset {len(rows[0]) + col} (column {col + 1})"), msg
    assert "iconv" in msg and data[len(rows[0]) + col] == 0xE9
    bom = _jsonl(tmp_path, b"\xef\xbb\xbf" + rows[0] + rows[2], "bom.jsonl")  # a BOM is not an error
    assert len(load_problems(_cfg(bom, num_eval=1))[0]) == 1


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda r: {"question": r["question"], "answer": None}, r":2: 'answer' is null"),
        (lambda r: {"question": r["question"]}, r":2: no 'answer' field \(fields present: \['question'\]\)"),
        (lambda r: {"question": "", "answer": r["answer"]}, r":2: 'question' is \"\""),
        (lambda r: {"question": r["question"], "answer": "text only #### "}, r":2: 'answer' has nothing after"),
        (lambda r: [r["question"]], r":2: a row must be a JSON object"),
    ],
)
def test_missing_or_null_fields_are_errors_not_the_gold_none(tmp_path, edit, expected):
    rows = _real_rows(3)
    rows[1] = json.dumps(edit(json.loads(rows[1])))
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=expected):
        load_problems(_cfg(path, num_eval=1))


def test_empty_file_and_split_leaving_no_training_row(tmp_path):
    empty = _jsonl(tmp_path, b"\n\n", "empty.jsonl")
    with pytest.raises(DataError, match=f"{empty} has no rows"):
        load_problems(_cfg(empty))
    five = _jsonl(tmp_path, _real_rows(5))
    with pytest.raises(DataError, match=r"has 5 rows and data.num_eval=200 .* set data.num_eval below 5"):
        load_problems(_cfg(five))  # the default num_eval: was 0 training rows, then ZeroDivisionError
    with pytest.raises(DataError, match="data.num_eval=0 must be >= 1"):
        load_problems(_cfg(five, num_eval=0))
    train, held = load_problems(_cfg(five, num_eval=4))
    assert (len(train), len(held)) == (1, 4)
    train, held = load_problems(_cfg(five, eval_path=five))  # a separate eval file may be as small as it likes
    assert (len(train), len(held)) == (5, 5)
    with pytest.raises(DataError, match="does not exist"):
        load_problems(_cfg(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="leave no training problem"):
        load_problems(DataConfig(arith_min=1, arith_max=1, arith_ops="+", num_train=5, num_eval=1))
    assert issubclass(DataError, ConfigError)  # r1mega-train prints it in one line, exit status 2


def test_cli_small_file_stops_before_the_model_is_built(tmp_path):
    """The issue's run: a JSONL with fewer rows than data.num_eval died with ZeroDivisionError after building the
    model and evaluating; now one line naming the file and the fix, exit status 2, no model built."""
    path = _jsonl(tmp_path, _real_rows(5))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.train", "data.task=jsonl", f"data.path={path}", "logging.wandb_mode=disabled",
         f"logging.out_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config error: {path} has 5 rows and data.num_eval=200" in proc.stderr
    assert "params on this rank" not in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ prompt sampler


def _old_batch(problems, per_step, dp_rank, dp_size, seed, step):
    """The original PromptSampler.batch (a full reshuffle per prompt): the reference the new one must match."""
    per_rank, start, out = per_step // dp_size, step * per_step, []
    for k in range(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank):
        epoch, i = divmod(k, len(problems))
        order = list(range(len(problems)))
        random.Random(seed + epoch).shuffle(order)
        out.append(problems[order[i]])
    return out


def test_prompt_sampler_matches_the_original_order_across_epochs_and_ranks():
    from r1mega.data.sampler import PromptSampler
    from r1mega.trainer import PromptSampler as FromTrainer

    assert FromTrainer is PromptSampler  # old import path still works
    problems = [Problem(f"q{i}", str(i)) for i in range(37)]  # 37: batches straddle epoch boundaries
    for dp_size in (1, 2, 4):
        samplers = [PromptSampler(problems, 8, r, dp_size, seed=11) for r in range(dp_size)]
        for step in [*range(12), 40, 3, 0]:  # any order: resumable by step index
            for r, s in enumerate(samplers):
                assert s.batch(step) == _old_batch(problems, 8, r, dp_size, 11, step), (dp_size, r, step)
    with pytest.raises(ValueError, match="divisible by the data-parallel size 3"):
        PromptSampler(problems, 8, 0, 3, seed=1)
    with pytest.raises(ValueError, match="no problems"):
        PromptSampler([], 8, 0, 1, seed=1)
