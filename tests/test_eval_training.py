"""Evaluation during training (r1mega/eval/training.py): which sets, the stop before training on a set the tokenizer
or the engine's context cannot take, and the trainer's keys from the runner's results (synthetic results; the real
path runs in tests/test_trainer.py and in the default job, whose numbers stayed those of the old evaluate)."""

from __future__ import annotations

import json

import pytest

from r1mega.config import Config, ConfigError
from r1mega.data.tasks import Problem
from r1mega.data.tokenizer import CharTokenizer
from r1mega.eval.results import EvalResults, ProblemResult, SampleResult, SetResult, summarize
from r1mega.eval.training import check_training_sets, training_metrics, training_sets, training_settings

HELDOUT = [Problem("1+2", "3"), Problem("2+2", "4")]


def _jsonl(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    return str(path)


def test_sets_order_limit_and_settings(tmp_path):
    cfg = Config()
    assert training_sets(cfg, HELDOUT) == {"heldout": HELDOUT}  # the default: the held-out problems only
    cfg.eval.sets, cfg.eval.limit = [_jsonl(tmp_path / "mine.jsonl", ["a", "b", "c"]), "heldout"], 2
    sets = training_sets(cfg, HELDOUT)
    assert list(sets) == ["heldout", "mine"] and [p.question for p in sets["mine"]] == ["a", "b"]
    s = cfg.rollout.sampling
    st = training_settings(cfg, 4, greedy=False)
    assert (st.k, st.temperature, st.top_p, st.top_k, st.seed) == (4, s.temperature, s.top_p, s.top_k, cfg.data.seed)
    assert st.max_new_tokens == s.max_new_tokens and st.template == cfg.data.template and not st.save_responses


def test_uncovered_or_too_long_set_stops_before_training(tmp_path):
    cfg = Config()
    cfg.eval.sets = ["heldout", _jsonl(tmp_path / "accents.jsonl", ["caf\u00e9 = ?"])]
    with pytest.raises(ConfigError, match="'accents' cannot be evaluated during training.*not in the char"):
        check_training_sets(cfg, CharTokenizer(), HELDOUT, context=512)
    cfg.eval.sets = ["heldout", _jsonl(tmp_path / "long.jsonl", ["1+1" * 100])]
    with pytest.raises(ConfigError, match="'long': its longest prompt .* exceeds the rollout engine's context"):
        check_training_sets(cfg, CharTokenizer(), HELDOUT, context=cfg.rollout.sampling.max_new_tokens + 50)
    check_training_sets(cfg, CharTokenizer(), HELDOUT, context=None)  # an engine that sizes itself


def _res(per_set: dict[str, list[list[bool]]]) -> EvalResults:
    sets = {}
    for name, flags in per_set.items():
        probs = [
            ProblemResult(i, "q", "1", [SampleResult("1" if c else "2", c, c, 3, True) for c in f], [], None, f[0])
            for i, f in enumerate(flags)
        ]
        sets[name] = SetResult(name, probs, summarize(probs))
    return EvalResults({}, sets, wall_s=1.5)


def test_keys_the_rest_of_the_code_reads():
    greedy = _res({"heldout": [[True], [False]], "gsm8k": [[False], [False]]})
    sampled = _res({"heldout": [[True, True, False, False], [False] * 4], "gsm8k": [[True, False, False, False]] * 2})
    m = training_metrics(greedy, sampled)
    assert m["eval/greedy_accuracy"] == 0.5 and m["eval/sampled_accuracy"] == 0.25
    assert m["eval/greedy_format"] == 0.5 and m["eval/sampled_format"] == 0.25
    assert m["eval/pass@4"] == 0.5 and m["eval/pass@2"] == pytest.approx((1 - 1 / 6) / 2)
    assert m["eval/cons@4"] == 0.5  # cons_correct stands in as given (the first sample's flag)
    assert m["eval/gsm8k/greedy_accuracy"] == 0.0 and m["eval/gsm8k/sampled_accuracy"] == 0.25
    assert m["eval/gsm8k/pass@4"] == 1.0 and m["eval/wall_s"] == 3.0
    one = training_metrics(greedy, greedy)  # train.eval_samples=1: no pass@k / cons columns
    assert not any("@" in k or k.endswith("_se") for k in one)
