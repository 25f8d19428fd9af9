"""A stopped evaluation goes on where it stopped (r1mega/eval/chunks.py): the finished chunks are not generated
again, the results equal a run that was never stopped, and anything that is not the same evaluation starts over."""

from __future__ import annotations

import json

import pytest

from r1mega.config import RewardConfig
from r1mega.data.tasks import Problem
from r1mega.data.tokenizer import CharTokenizer
from r1mega.eval.chunks import chunk_path
from r1mega.eval.results import to_dict
from r1mega.eval.runner import EvalSettings, evaluate, remove_chunks
from r1mega.rewards import RewardScorer
from r1mega.rollout.base import Rollout

OK = "<think>x</think><answer>{}</answer>"
SETS = {"a": [Problem("12*7", "84"), Problem("6*7", "42")], "b": [Problem("1+4", "5")]}
# k = 2 samples a problem, one problem a chunk: 3 chunks of 2 answers
TEXTS = [OK.format(84), "no idea", OK.format(41), OK.format(42), OK.format(5), OK.format(5)]


class Engine:
    """Answers with the next scripted texts; ``fail_at``: the engine call (0-based) that raises, as a kill would."""

    def __init__(self, texts, fail_at: int | None = None):
        self.tok, self.texts, self.fail_at, self.calls = CharTokenizer(), list(texts), fail_at, []

    def resume_memory(self):
        pass

    def release_memory(self):
        pass

    def generate(self, prompts, params):
        if len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        self.calls.append(params.seed)
        return [Rollout(p, self.tok.encode(self.texts.pop(0)) + [self.tok.eos_id], [0.0], True) for p in prompts]


def _settings(**kw) -> EvalSettings:
    return EvalSettings(**{"k": 2, "template": "compact", "max_new_tokens": 64, "progress": False,
                           "chunk_problems": 1, **kw})  # fmt: skip


def _same(a, b) -> bool:
    da, db = to_dict(a), to_dict(b)
    for d in (da, db):
        d.pop("wall_s"), d.pop("generation_s")
    return da == db


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=1)) as s:
        yield s


def test_a_stopped_run_resumes_after_its_last_chunk_and_equals_an_unstopped_one(tmp_path, scorer):
    tok, out = CharTokenizer(), tmp_path / "eval.json"
    whole = evaluate(Engine(TEXTS), tok, scorer, SETS, _settings())
    with pytest.raises(RuntimeError, match="killed"):  # stopped during the third chunk
        evaluate(Engine(TEXTS, fail_at=2), tok, scorer, SETS, _settings(), chunks_path=out)
    assert len(chunk_path(out, 0).read_text().splitlines()) == 2
    again = Engine(TEXTS[4:])
    resumed = evaluate(again, tok, scorer, SETS, _settings(), chunks_path=out)
    assert again.calls == [2]  # only the third chunk, with its own seed (eval.seed + chunk)
    assert _same(resumed, whole)
    assert resumed.generated_tokens == whole.generated_tokens
    remove_chunks(out)
    assert not chunk_path(out, 0).exists()


def test_a_torn_line_or_another_evaluation_starts_over_from_what_is_valid(tmp_path, scorer):
    tok, out = CharTokenizer(), tmp_path / "eval.json"
    with pytest.raises(RuntimeError):
        evaluate(Engine(TEXTS, fail_at=2), tok, scorer, SETS, _settings(), chunks_path=out)
    path = chunk_path(out, 0)
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing chunk 1
    again = Engine(TEXTS[2:])
    evaluate(again, tok, scorer, SETS, _settings(), chunks_path=out)
    assert again.calls == [1, 2]
    assert [json.loads(x)["chunk"] for x in path.read_text().splitlines()] == [0, 1, 2]

    other = Engine(TEXTS)  # other settings: not the same evaluation, every chunk again
    evaluate(other, tok, scorer, SETS, _settings(max_new_tokens=32), chunks_path=out)
    assert other.calls == [0, 1, 2]
    fresh = Engine(TEXTS)  # eval.resume=false: the same evaluation from the start
    evaluate(fresh, tok, scorer, SETS, _settings(max_new_tokens=32), chunks_path=out, resume=False)
    assert fresh.calls == [0, 1, 2]
    changed = {"a": SETS["a"], "b": [Problem("1+5", "6")]}  # other problems: the key covers all of the rank's
    moved = Engine(TEXTS[:4] + [OK.format(6)] * 2)
    res = evaluate(moved, tok, scorer, changed, _settings(max_new_tokens=32), chunks_path=out)
    assert moved.calls == [0, 1, 2] and res.sets["b"].metrics["pass@1"] == 1.0


def test_ranks_stopped_at_different_chunks_resume_from_the_same_one(tmp_path):
    """The engine calls are collective (TP / EP): every rank must skip the same chunks, the fewest any rank has."""
    from tests.launch import REPO, run_ranks

    run_ranks(REPO / "tests" / "eval_resume_worker.py", [str(tmp_path)], nproc=2)
    got = [json.loads((tmp_path / f"calls.rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [[1, 2], [1, 2]]
