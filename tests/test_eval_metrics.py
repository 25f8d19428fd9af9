"""Evaluation numbers against independent references: pass@k by enumerating every subset, exact binomials for
large n; cons@k on hand-made vote tables (ties, equivalent answers written differently, missing answers); the
results JSON round trip."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest

from r1mega.eval.metrics import cons_at_k, default_pass_at, pass_at_k, standard_error
from r1mega.eval.results import (
    EvalResults,
    ProblemResult,
    SampleResult,
    SetResult,
    load_results,
    save_results,
    summarize,
    to_dict,
)
from r1mega.rewards.math import is_equivalent


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        correct = [i < c for i in range(n)]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_binomials():
    for n, c, k in [(64, 1, 1), (64, 3, 16), (64, 10, 32), (200, 7, 100), (64, 0, 64), (64, 63, 2)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the mean correctness
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert default_pass_at(16) == [1, 2, 4, 8, 16] and default_pass_at(6) == [1, 2, 4, 6] and default_pass_at(1) == [1]


def _vote(answers, correct=None):
    correct = [False] * len(answers) if correct is None else correct
    return cons_at_k(answers, correct, is_equivalent)


def test_cons_equivalent_answers_written_differently_are_one_vote():
    # 1/2 three ways vs 3 twice: the 1/2 cluster (3 votes) wins though no single string occurs more than twice
    ok, win, votes = _vote(["3", "\\frac{1}{2}", "0.5", "3", "\\dfrac{1}{2}"], [False, True, True, False, True])
    assert [(v.answer, v.first, v.count) for v in votes] == [("3", 0, 2), ("\\frac{1}{2}", 1, 3)]
    assert ok and win.answer == "\\frac{1}{2}"
    # numbers: thousands commas, trailing zeros
    _, win, votes = _vote(["1,000", "7", "1000", "1000.0"])
    assert (win.answer, win.count, len(votes)) == ("1,000", 3, 2)
    # is_equivalent(pred, gold) refuses \frac{4}{2} against an integer reference; as votes the two are one number
    assert not is_equivalent("\\frac{4}{2}", "2")
    _, win, votes = _vote(["2", "\\frac{4}{2}", "5"])
    assert (win.answer, win.count, len(votes)) == ("2", 2, 2)


def test_cons_ties_go_to_the_earliest_first_occurrence():
    _, win, _ = _vote(["4", "5", "5", "4"])
    assert (win.answer, win.first) == ("4", 0)
    _, win, _ = _vote(["5", "4", "4", "5"])
    assert win.answer == "5"
    _, win, _ = _vote(["9", "4", "5", "5", "4"])  # 4 and 5 tie at two; 4 occurs first
    assert (win.answer, win.count) == ("4", 2)


def test_cons_missing_answers_never_win():
    ok, win, votes = _vote([None, None, None, "7"], [False, False, False, True])
    assert ok and win.answer == "7" and [v.count for v in votes] == [1]
    ok, win, votes = _vote([None, None], [False, False])
    assert not ok and win is None and votes == []
    # the vote's correctness is its first member's
    ok, win, _ = _vote(["6", None, "6", "8"], [False, False, False, True])
    assert not ok and win.answer == "6"
    with pytest.raises(ValueError):
        cons_at_k(["1"], [True, False])


def _problem(index, flags, answers, cons):
    samples = [
        SampleResult(answer=a, correct=f, format=a is not None, length=10 + i, finished=i % 3 != 2, response=f"r{i}")
        for i, (f, a) in enumerate(zip(flags, answers))
    ]
    ok, win, votes = cons_at_k(answers, flags, is_equivalent)
    assert ok == cons
    return ProblemResult(index, f"q{index}", "1", samples, votes, win and win.answer, ok)


def test_summary_numbers_and_json_round_trip(tmp_path):
    problems = [
        _problem(0, [True, False, False, True], ["1", "2", "2", "1.0"], True),
        _problem(1, [False, False, False, False], ["3", None, "4", "3"], False),
        _problem(2, [True, True, True, False], ["1", "1", "1", None], True),
    ]
    m = summarize(problems)
    per = [2 / 4, 0.0, 3 / 4]
    assert m["pass@1"] == pytest.approx(sum(per) / 3)
    assert m["pass@1_se"] == pytest.approx(standard_error(per))
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 3, 2)) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3) and m["cons@4"] == pytest.approx(2 / 3)
    assert m["answer_rate"] == pytest.approx(10 / 12) and m["format_rate"] == pytest.approx(10 / 12)
    assert m["length_mean"] == pytest.approx(11.5) and m["truncated_frac"] == pytest.approx(3 / 12)
    one = summarize(problems[:1])
    assert math.isnan(one["pass@1_se"])  # one problem: no spread
    results = EvalResults(
        {"k": 4, "greedy": False},
        {"a": SetResult("a", problems, m), "b": SetResult("b", problems[:1], one)},
        wall_s=1.5,
        generation_s=1.0,
        generated_tokens=42,
        meta={"model": "x"},
    )
    path = save_results(results, tmp_path / "out" / "eval.json")
    raw = json.loads(path.read_text())  # strict JSON: NaN is written as null
    assert raw["summary"]["b"]["pass@1_se"] is None and raw["sets"]["a"][0]["num_correct"] == 2
    assert raw["sets"]["a"][1]["samples"][1] == {
        "answer": None,
        "correct": False,
        "format": False,
        "length": 11,
        "finished": True,
        "response": "r1",
    }
    back = load_results(path)
    assert to_dict(back) == to_dict(results)
    assert back.sets["a"].problems[0].votes[0].count == 2 and back.gen_tokens_per_s == pytest.approx(42.0)
    for name, s in back.sets.items():  # the summary is recomputable from the per-problem records alone
        again = summarize(s.problems)
        assert to_dict(EvalResults({}, {name: SetResult(name, [], again)})) == to_dict(
            EvalResults({}, {name: SetResult(name, [], s.metrics)})
        )
    flat = back.flat_metrics()
    assert flat["eval/a/cons@4"] == pytest.approx(2 / 3) and "eval/b/pass@1" in flat


def test_answer_extraction_rules():
    from r1mega.eval.runner import answer_of

    assert answer_of("12 times 7 is 72.") is None  # R1's rule: no tag, no box, no answer
    assert answer_of("12 times 7 is 72.", "last_number") == "72"
    assert answer_of("so $1,250 in all, or -3.5 each", "last_number") == "-3.5"
    assert answer_of("total 1,250.", "last_number") == "1250"
    assert answer_of("x \\boxed{7} then 9", "last_number") == "7"  # a box (or <answer>) wins over the last number
    assert answer_of("<answer>4</answer> 5", "last_number") == "4"
    assert answer_of("no digits here", "last_number") is None


class _ScriptedEngine:
    """Answers every prompt with the next scripted text (CharTokenizer ids)."""

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)

    def resume_memory(self):
        pass

    def release_memory(self):
        pass

    def generate(self, prompts, params):
        from r1mega.rollout.base import Rollout

        out = [self.texts.pop(0) for _ in prompts]
        return [
            Rollout(p, self.tok.encode(t) + [self.tok.eos_id], [0.0] * (len(t) + 1), True) for p, t in zip(prompts, out)
        ]


@pytest.mark.parametrize(
    "rule, correct, answered", [("strict", [0, 1, 0], [0, 1, 0]), ("last_number", [1, 1, 0], [1, 1, 1])]
)
def test_evaluate_scores_the_answer_the_rule_extracts(rule, correct, answered):
    from r1mega.config import RewardConfig
    from r1mega.data.tasks import Problem
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.eval.runner import EvalSettings, evaluate
    from r1mega.rewards import RewardScorer

    tok = CharTokenizer()
    texts = ["12 times 7 is 72.", "<think>6*7</think><answer>42</answer>", "it is 5"]
    problems = [Problem("12*7", "72"), Problem("6*7", "42"), Problem("2+2", "4")]
    settings = EvalSettings(greedy=True, template="compact", max_new_tokens=64, progress=False, extract=rule)
    with RewardScorer(RewardConfig(num_workers=1)) as scorer:
        res = evaluate(_ScriptedEngine(tok, texts), tok, scorer, {"s": problems}, settings)
    samples = [p.samples[0] for p in res.sets["s"].problems]
    assert [int(s.correct) for s in samples] == correct
    assert [int(s.answer is not None) for s in samples] == answered
    assert [int(s.format) for s in samples] == [0, 1, 0]  # the format reward is R1's under either rule


def test_progress_standard_error_groups_the_samples_of_each_problem(tmp_path):
    """With k samples per problem the running pass@1 se is over problems (each one's fraction correct), as the
    final summary's: brute force against the sample std / sqrt(n) of those fractions; a problem cut off in the
    middle of its samples is not counted."""
    import json
    import math

    from r1mega.eval.chunks import Sample
    from r1mega.eval.runner import write_progress

    k, correct = 4, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    samples = [Sample("1", float(c), 1.0, 10, True, None) for row in correct for c in row]
    names = ["s"] * len(samples)
    path = tmp_path / "p.json"
    write_progress(path, names, samples[:-1], chunks=1, of=2, wall_s=1.0, gen_s=1.0, per_problem=k)  # 3 whole
    fr = [sum(r) / k for r in correct[:3]]
    m = sum(fr) / 3
    got = json.loads(path.read_text())["sets"]["s"]
    assert got["problems"] == 3
    assert got["pass@1_se"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in fr) / 2 / 3))


def test_progress_file_tracks_the_chunks_and_ends_at_the_summary(tmp_path):
    """evaluate(progress_path=...): rewritten after every chunk; its last state has every sample of every set and
    the same pass@1 / format rate as the final summary (what a run stopped by a time limit leaves behind)."""
    import json

    from r1mega.config import RewardConfig
    from r1mega.data.tasks import Problem
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.eval.runner import EvalSettings, evaluate
    from r1mega.rewards import RewardScorer

    tok = CharTokenizer()
    ok, bad = "<think>x</think><answer>{}</answer>", "no idea"
    texts = [ok.format(72), bad, ok.format(5), ok.format(4)]
    sets = {"a": [Problem("12*7", "72"), Problem("6*7", "42")], "b": [Problem("1+4", "5"), Problem("2+2", "3")]}
    settings = EvalSettings(greedy=True, template="compact", max_new_tokens=64, progress=False, chunk_problems=3)
    path = tmp_path / "eval_progress.json"
    with RewardScorer(RewardConfig(num_workers=1)) as scorer:
        res = evaluate(_ScriptedEngine(tok, texts), tok, scorer, sets, settings, progress_path=path)
    got = json.loads(path.read_text())
    assert (got["chunks_done"], got["chunks"]) == (2, 2) and not path.with_name(path.name + ".tmp").exists()
    rates = {
        name: {k: v for k, v in d.items() if k in ("samples", "pass@1", "format_rate", "answer_rate")}
        for name, d in got["sets"].items()
    }
    assert rates == {
        "a": {"samples": 2, "pass@1": 0.5, "format_rate": 0.5, "answer_rate": 0.5},
        "b": {"samples": 2, "pass@1": 0.5, "format_rate": 1.0, "answer_rate": 1.0},
    }
    lengths = [len(tok.encode(t)) + 1 for t in texts]  # the scripted engine: each text whole, then eos
    assert got["sets"]["a"]["length_mean"] == pytest.approx(sum(lengths[:2]) / 2)
    assert got["sets"]["b"]["truncated_frac"] == 0.0
    assert got["generated_tokens"] == res.generated_tokens == sum(lengths)
    assert got["gen_tokens_per_s"] == pytest.approx(got["generated_tokens"] / got["generation_s"])
    for name in sets:
        assert got["sets"][name]["pass@1"] == pytest.approx(res.sets[name].metrics["pass@1"])
        assert got["sets"][name]["pass@1_se"] == pytest.approx(res.sets[name].metrics["pass@1_se"])
        assert got["sets"][name]["problems"] == len(sets[name])
