"""tools/compare_eval_engines.py on synthetic results: pass@1, its standard error and the z-test recomputed with
``statistics`` from the per-problem sample flags; agreement / disagreement and the exit status."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
from pathlib import Path

import pytest

from r1mega.eval.compare import compare_results
from r1mega.eval.results import EvalResults, ProblemResult, SampleResult, SetResult, save_results, summarize

ROOT = Path(__file__).resolve().parents[1]


def _results(rates: list[float], k: int, seed: int) -> tuple[EvalResults, list[list[bool]]]:
    rng = random.Random(seed)
    flags = [[rng.random() < r for _ in range(k)] for r in rates]
    problems = [
        ProblemResult(i, f"q{i}", "1", [SampleResult("1" if c else "2", c, True, 5, True) for c in f], [], None, False)
        for i, f in enumerate(flags)
    ]
    s = SetResult("gsm8k", problems, summarize(problems))
    return EvalResults({"k": k, "greedy": False, "temperature": 0.6}, {"gsm8k": s}), flags


def _reference(fa: list[list[bool]], fb: list[list[bool]]) -> tuple[float, float, float, float, float]:
    xa, xb = [sum(f) / len(f) for f in fa], [sum(f) / len(f) for f in fb]
    sa, sb = statistics.stdev(xa) / math.sqrt(len(xa)), statistics.stdev(xb) / math.sqrt(len(xb))
    z = (statistics.fmean(xa) - statistics.fmean(xb)) / math.hypot(sa, sb)
    return statistics.fmean(xa), sa, statistics.fmean(xb), sb, z


@pytest.mark.parametrize("shift, agree", [(0.0, True), (0.35, False)])
def test_z_test_against_statistics(shift, agree):
    rng = random.Random(0)
    rates = [rng.random() * 0.6 for _ in range(80)]
    a, fa = _results(rates, 8, 1)  # the same problems, independent samples: the two engines
    b, fb = _results([min(r + shift, 1.0) for r in rates], 8, 2)
    (row,) = compare_results(a, b)
    want = _reference(fa, fb)
    assert (row.pass1_a, row.se_a, row.pass1_b, row.se_b, row.z) == pytest.approx(want, rel=1e-12)
    assert row.pass1_a == pytest.approx(a.sets["gsm8k"].metrics["pass@1"])
    assert row.se_a == pytest.approx(a.sets["gsm8k"].metrics["pass@1_se"])
    d = [sum(x) / 8 - sum(y) / 8 for x, y in zip(fa, fb)]
    assert row.paired_z == pytest.approx(statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d))))
    assert row.agree is agree and row.problems == 80


def test_only_shared_problems_are_compared():
    a, _ = _results([0.5] * 10, 4, 3)
    b, _ = _results([0.5] * 6, 4, 4)
    (row,) = compare_results(a, b)
    assert row.problems == 6
    assert row.pass1_a == pytest.approx(sum(p.num_correct for p in a.sets["gsm8k"].problems[:6]) / 24)


def test_tool_prints_and_exits_by_agreement(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_eval_engines", ROOT / "tools" / "compare_eval_engines.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rates = [i / 40 for i in range(40)]
    same, far = _results(rates, 16, 5)[0], _results([0.9] * 40, 16, 6)[0]
    paths = [save_results(r, tmp_path / f"{n}.json") for n, r in (("m", _results(rates, 16, 7)[0]), ("s", same))]
    assert tool.main([str(paths[0]), str(paths[1])]) == 0
    out = capsys.readouterr().out
    assert "megatron %" in out and "sglang %" in out and "yes" in out
    assert all(m in out for m in ("pass@1", "answered", "format", "finished"))
    far_path = save_results(far, tmp_path / "far.json")
    assert tool.main([str(paths[0]), str(far_path), "--labels", "x", "y"]) == 1
    assert "NO" in capsys.readouterr().out


def _unanswered(rates: list[float], k: int, seed: int) -> EvalResults:
    """Nothing correct (SmolLM2 on GSM8K); each sample gives an answer with the problem's rate."""
    rng = random.Random(seed)
    problems = [
        ProblemResult(
            i,
            f"q{i}",
            "1",
            [SampleResult("2" if rng.random() < r else None, False, False, 5, True) for _ in range(k)],
            [],
            None,
            False,
        )  # fmt: skip
        for i, r in enumerate(rates)
    ]
    return EvalResults({"k": k}, {"gsm8k": SetResult("gsm8k", problems, summarize(problems))})


def test_other_rates_tell_engines_apart_when_pass1_is_zero():
    a, b = _unanswered([0.05] * 60, 8, 1), _unanswered([0.6] * 60, 8, 2)
    rows = {r.metric: r for r in compare_results(a, b, metrics=("pass@1", "answered", "format"))}
    assert rows["pass@1"].agree and rows["pass@1"].pass1_a == rows["pass@1"].pass1_b == 0.0
    assert not rows["answered"].agree and rows["answered"].pass1_b > 0.5 > rows["answered"].pass1_a
    assert rows["format"].agree
    with pytest.raises(ValueError, match="unknown metric"):
        compare_results(a, b, metrics=("bogus",))
