"""Tests for r1mega.rewards: answer extraction, equivalence on real data quirks, format reward, the scorer pool.

Fixture rows are real rows of /work/shared/data (tests/fixtures/README.md says which). The scorer tests point
the workers at ``chaos_verify`` below (``verify_fn=CHAOS``, "test_rewards:chaos_verify"), which hangs, crashes or
raises on marked answers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from r1mega.rewards import (
    RewardBatch,
    RewardScorer,
    accuracy_reward,
    extract_answer,
    format_reward,
    is_equivalent,
)
from r1mega.rewards.math import fast_equivalent

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path("/work/shared/data")

# Spawned workers import the hooks below by module name; spawn hands this process's sys.path to them, so make
# sure this directory is on it whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))
CHAOS = f"{Path(__file__).stem}:chaos_verify"


# ------------------------------------------------------------------ verifier hooks run inside workers


def chaos_verify(pred: str, gold: str) -> bool:
    """is_equivalent, except: a pred containing HANG sleeps forever, CRASH kills the process, RAISE raises."""
    if "HANG" in pred:
        time.sleep(3600)
    if "CRASH" in pred:
        os._exit(17)
    if "RAISE" in pred:
        raise ValueError("verifier blew up")
    return is_equivalent(pred, gold)


@pytest.fixture(autouse=True)
def _generous_in_process_alarm(monkeypatch):
    """In-process is_equivalent calls (the sweep) use math-verify's 5 s signal.alarm; some benign comparisons take
    seconds on a loaded 2-core box, and a hit alarm reads as "not equivalent". Keep a limit, a generous one."""
    import r1mega.rewards.math as rmath

    monkeypatch.setattr(rmath, "MATH_VERIFY_ALARM_S", 60)


@dataclass
class _Cfg:  # duck-typed RewardConfig, so these tests do not depend on hydra/omegaconf
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    timeout_s: float = 1.0
    num_workers: int = 2


def _cfg(**kw) -> _Cfg:
    return _Cfg(**kw)


def test_real_reward_config_is_accepted():
    from r1mega.config import RewardConfig

    scorer = RewardScorer(RewardConfig())
    try:
        assert scorer.timeout_s == RewardConfig().timeout_s and scorer.num_workers == RewardConfig().num_workers
        assert scorer.score(["<think>a</think><answer>7</answer>"], ["7"]).total == [2.0]
    finally:
        scorer.close()


# ------------------------------------------------------------------ fixtures from the shared data


def _load_rows() -> list[tuple[str, str]]:
    rows = []
    for line in (FIXTURES / "reward_rows.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        answer = rec["row"]["answer"]
        gold = answer.split("#### ")[-1].strip() if rec["source"].startswith("gsm8k/") else str(answer)
        rows.append((f"{rec['source']}:{rec['line']}", gold))
    return rows


ROWS = _load_rows()
GOLDS = [g for _, g in ROWS]


def test_fixture_is_small_and_covers_the_quirks():
    assert (FIXTURES / "reward_rows.jsonl").stat().st_size < 50_000
    assert {"2,125", "1,450,000", "025", "336^\\circ", "3159.0", "(3,4]", "\\dfrac{17}{50}", "-50"} <= set(GOLDS)


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[rid for rid, _ in ROWS])
def test_sweep_gold_reformatted_is_equivalent_other_row_is_not(i):
    gold = GOLDS[i]
    assert is_equivalent(gold, gold)
    # the model puts the gold answer in \boxed{} (no answer tag) ...
    boxed = f"Thus the answer is $\\boxed{{{gold}}}$."
    assert extract_answer(boxed) == gold.strip()
    assert accuracy_reward(boxed, gold) == 1.0
    # ... or in an <answer> tag, with the R1 format
    tagged = f"<think>\nLet me work it out.\n</think>\n<answer> {gold} </answer>"
    assert accuracy_reward(tagged, gold) == 1.0
    assert format_reward(tagged) == 1.0
    # the answer of another row (all fixture answers are pairwise different values) is wrong
    for other in (GOLDS[(i + 1) % len(GOLDS)], GOLDS[(i + 17) % len(GOLDS)]):
        assert not is_equivalent(other, gold), (other, gold)
        assert accuracy_reward(f"<answer>{other}</answer>", gold) == 0.0


# ------------------------------------------------------------------ equivalence on real data quirks


@pytest.mark.parametrize(
    "pred, gold",
    [
        # GSM8K thousands commas (gsm8k/test.jsonl lines 147, 612)
        ("2125", "2,125"),
        ("2,125", "2125"),
        ("1450000", "1,450,000"),
        ("$1,450,000", "1,450,000"),
        ("\\$1,450,000", "1,450,000"),
        ("-10", "-10"),
        # AIME zero padding (aime24 "025")
        ("25", "025"),
        ("025", "25"),
        ("+25", "025"),
        ("25.0", "025"),
        # aime25 id 19
        ("336", "336^\\circ"),
        ("336^{\\circ}", "336^\\circ"),
        ("336^\\circ", "336"),
        # amc23 floats
        ("3159", "3159.0"),
        ("-1", "-1.0"),
        # MATH-500
        ("\\frac{17}{50}", "\\dfrac{17}{50}"),
        ("0.34", "\\dfrac{17}{50}"),
        ("\\frac{4}{3}", "\\frac43"),
        ("\\frac{5}{9}", "\\frac 59"),
        ("\\sqrt{117}", "3\\sqrt{13}"),
        ("11\\sqrt{2}", "11\\sqrt2"),
        ("-\\frac{35}{9}", "-\\frac{35}{9}"),
        ("\\left(\\frac35, \\frac83\\right]", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]"),
        ("(-\\infty,0]", "(-\\infty, 0]"),
        ("[-2,7]", "x \\in [-2,7]"),
        ("(0,9)\\cup(9,36)", "(0,9) \\cup (9,36)"),
        ("\\left(3, \\frac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"),
        ("-2, 1", "1,-2"),
        ("5", "x=5"),
        ("x = 5", "5"),
        ("6-5i", "6 - 5i"),
        ("10080", "10,\\!080"),
        ("11111111100", "11,\\! 111,\\! 111,\\! 100"),
        ("32348", "\\$32,\\!348"),
        ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
        ("6.72 \\times 10^{-5}", ".0000672"),
        ("-50", "-50"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("The answer is $\\frac12$.", "\\frac{1}{2}"),
        ("18 \\text{ dollars}", "18"),
        ("The answer is 42.", "42"),
        ("42 apples", "42"),
        ("37 + 45 = 82", "82"),
        ("\\(1,080\\)", "1080"),
        ("\\frac{5}{4}", "1.25"),  # a non-integer number may be written as a fraction
        ("\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"),
    ],
)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("25", "250"),
        ("250", "025"),
        ("2125", "2,126"),
        ("1,2", "12"),  # a tuple is not the number 12
        ("10", "-10"),
        ("-336", "336^\\circ"),
        ("2\\sqrt{2}", "2"),  # must not be read as the leading 2
        ("[3,4]", "(3,4]"),  # interval ends matter
        ("(3,4)", "(3,4]"),
        ("p + q", "p - q"),
        ("\\text{(E)}", "\\text{(C)}"),
        ("6+5i", "6 - 5i"),
        ("", "5"),
        ("5", ""),
        # an integer answer must be written as an integer: math-verify would evaluate these, so echoing the
        # question of an arithmetic prompt ("37+45=?") would be rewarded
        ("37+45", "82"),
        ("6*7", "42"),
        ("2^{5}", "32"),
        ("\\frac{84}{2}", "42"),
        ("\\frac{1}{2}", "2"),
        ("\\sqrt{9}", "3"),
        ("2 pi", "2"),
        ("x \\le 5", "5"),
    ],
)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


def test_fast_path_decides_numbers_only():
    assert fast_equivalent("1,234", "1234") is True
    assert fast_equivalent("025", "26") is False
    assert fast_equivalent("\\frac{1}{2}", "0.5") is None  # non-integer gold: left to math-verify
    assert fast_equivalent("\\frac{1}{2}", "\\frac{1}{2}") is None  # gold not a plain number
    assert fast_equivalent("1,2", "12") is False  # "1,2" is not a thousands-separated number; gold is an integer


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").exists(), reason="shared data not mounted")
def test_every_gsm8k_and_aime_quirk_in_the_shared_data():
    commas = []
    for line in (SHARED_DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        gold = json.loads(line)["answer"].split("#### ")[-1].strip()
        if "," in gold:
            commas.append(gold)
    assert len(commas) == 14  # as documented in /work/shared/data/README.md
    for gold in commas:
        assert is_equivalent(gold.replace(",", ""), gold) and not is_equivalent(gold.replace(",", "") + "0", gold)
    for line in (SHARED_DATA / "aime24" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        gold = json.loads(line)["answer"]
        assert is_equivalent(str(int(gold)), gold) and not is_equivalent(str(int(gold) + 1), gold)


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think> <answer>42</answer>", "42"),
        ("<answer>1</answer> wait, no <answer> 2 </answer>", "2"),  # the last tag wins
        ("<answer>\\frac{1}{2}</answer> and \\boxed{7}", "\\frac{1}{2}"),  # tag beats boxed
        ("so \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # last box; escaped braces do not count
        ("\\fbox{5}", "5"),
        ("answer is \\boxed 7.", "7"),
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),  # unbalanced last box: the earlier complete one
        ("<answer>5", None),  # truncated answer tag, no box
        ("<answer>  </answer>", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ------------------------------------------------------------------ format reward


@pytest.mark.parametrize(
    "response",
    [
        "<think>reasoning</think><answer>42</answer>",
        " <think>\nstep 1\nstep 2\n</think>\n\n<answer> 42 </answer>\n",
        "<think></think> <answer>x</answer>",
    ],
)
def test_format_positive(response):
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<answer>42</answer>",  # no think
        "<think>r</think>",  # no answer
        "<think>r</think> 42",
        "<answer>42</answer><think>r</think>",  # wrong order
        "<think>r</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>r</think><answer>   </answer>",  # empty answer
        "<think>r</think><answer>42</answer> and more text",  # text after </answer>
        "text first <think>r</think><answer>42</answer>",
        "<think>r</think> then <answer>42</answer>",
        "<think>a <think> b</think><answer>42</answer>",
        "<think>r<answer>42</answer></think>",
        "<think>r</think><answer>42",  # truncated
        "",
    ],
)
def test_format_negative(response):
    assert format_reward(response) == 0.0


def test_format_think_in_prompt():
    assert format_reward("reasoning</think><answer>4</answer>") == 0.0
    assert format_reward("reasoning</think><answer>4</answer>", think_in_prompt=True) == 1.0
    assert format_reward("<think>reasoning</think><answer>4</answer>", think_in_prompt=True) == 1.0


# ------------------------------------------------------------------ scorer


@pytest.fixture(scope="module")
def chaos_scorer():
    scorer = RewardScorer(_cfg(timeout_s=2.0, num_workers=2), verify_fn=CHAOS)
    scorer.start(wait=True)
    assert scorer.num_live_workers == 2
    yield scorer
    scorer.close()
    assert scorer.num_live_workers == 0


def _resp(answer: str) -> str:
    return f"<think>thinking</think> <answer>{answer}</answer>"


def test_integer_batch_never_starts_workers():
    with RewardScorer(_cfg(format_weight=0.5)) as scorer:
        batch = scorer.score(
            [_resp("1,080"), _resp("25"), "\\boxed{7}", "<answer>8</answer> extra", "nothing", _resp("37+45")],
            ["1080", "025", "7", "9", "3", "82"],
        )
        assert batch.accuracy == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        assert batch.format == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        assert batch.total == [1.5, 1.5, 1.0, 0.0, 0.0, 0.5]
        assert scorer.num_live_workers == 0  # lazy: the fast path decided everything


def test_degenerate_long_responses_stay_cheap_in_the_parent():
    junk = [
        "<answer>" + "answer is " * 20_000 + "5</answer>",
        "\\boxed{" * 20_000,
        "<think>" + "x" * 200_000,
        "<answer>" + "1+" * 5_000 + "1</answer>",  # too long to verify: not sent to a worker
    ]
    with RewardScorer(_cfg()) as scorer:
        t0 = time.monotonic()
        batch = scorer.score(junk, ["5", "5", "5", "\\frac{1}{2}"])
        assert time.monotonic() - t0 < 1.0
        assert batch.accuracy == [0.0] * 4 and scorer.num_live_workers == 0


def test_scorer_mixed_batch():
    responses = [
        _resp("\\frac{1}{2}"),
        _resp("\\frac{1}{3}"),
        "The answer is \\boxed{\\dfrac{17}{50}}",
        _resp("(3, 4]"),
        _resp("[3, 4]"),
        _resp("250"),
        _resp("1,450,000"),
        "<think>no answer</think>",
        _resp("\\frac{1}{2}"),  # duplicate pair: verified once
    ]
    golds = ["0.5", "0.5", "0.34", "(3,4]", "(3,4]", "25", "1,450,000", "3", "0.5"]
    with RewardScorer(_cfg(accuracy_weight=1.0, format_weight=0.25, timeout_s=10.0)) as scorer:
        batch = scorer.score(responses, golds)
        assert isinstance(batch, RewardBatch)
        assert batch.accuracy == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
        assert batch.format == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
        assert batch.total == [a + 0.25 * f for a, f in zip(batch.accuracy, batch.format, strict=True)]
        assert (batch.num_timeouts, batch.num_errors) == (0, 0)
        assert scorer.num_verified == 5  # distinct non-numeric (pred, gold) pairs; numbers never leave the parent
        assert scorer.score([], []) == RewardBatch([], [], [], 0, 0)
        with pytest.raises(ValueError):
            scorer.score(["a"], [])


def test_hanging_verifier_costs_only_its_sample(chaos_scorer):
    # cheap pairs only (tens of ms): on a loaded 2-core box a slow legitimate pair could itself hit the timeout
    responses = [_resp("\\frac{2}{4}"), _resp("\\text{HANG}"), _resp("\\sqrt{8}"), _resp("7"), _resp("\\frac{1}{3}")]
    golds = ["\\frac12", "\\pi", "2\\sqrt{2}", "7", "0.5"]
    chaos_scorer.start(wait=True)  # both workers ready (a replacement from another test may still be starting)
    restarts = chaos_scorer.num_restarts
    t0 = time.monotonic()
    batch = chaos_scorer.score(responses, golds)
    elapsed = time.monotonic() - t0
    assert elapsed < chaos_scorer.timeout_s + 2.0, (elapsed, batch)
    assert batch.accuracy == [1.0, 0.0, 1.0, 1.0, 0.0], batch
    assert batch.format == [1.0] * 5
    assert (batch.num_timeouts, batch.num_errors) == (1, 0)
    assert chaos_scorer.num_restarts == restarts + 1  # the hung worker was killed and replaced
    # the pool keeps working, and the hung pair is remembered rather than re-run
    t0 = time.monotonic()
    again = chaos_scorer.score([_resp("\\text{HANG}"), _resp("\\frac{1}{2}")], ["\\pi", "0.5"])
    assert time.monotonic() - t0 < chaos_scorer.timeout_s
    assert again.accuracy == [0.0, 1.0] and again.num_timeouts == 1


def test_crashing_verifier_costs_only_its_sample(chaos_scorer):
    responses = [_resp("\\frac{3}{4}"), _resp("\\text{CRASH}"), _resp("\\sqrt{9}"), _resp("\\frac{2}{3}")]
    golds = ["0.75", "\\pi", "\\sqrt{9}", "0.5"]
    restarts = chaos_scorer.num_restarts
    batch = chaos_scorer.score(responses, golds)
    assert batch.accuracy == [1.0, 0.0, 1.0, 0.0]
    assert (batch.num_timeouts, batch.num_errors) == (0, 1)
    assert chaos_scorer.num_restarts == restarts + 1
    later = chaos_scorer.score([_resp("\\frac{1}{4}"), _resp("\\sqrt{4}")], ["0.25", "\\sqrt{4}"])
    assert later.accuracy == [1.0, 1.0] and later.num_errors == 0
    # a crash is not cached: the same pair crashes (and is counted) again
    assert chaos_scorer.score([_resp("\\text{CRASH}")], ["\\pi"]).num_errors == 1


def test_raising_verifier_keeps_its_worker(chaos_scorer):
    restarts = chaos_scorer.num_restarts
    batch = chaos_scorer.score([_resp("\\text{RAISE}"), _resp("\\frac{9}{3}")], ["\\pi", "\\sqrt{9}"])
    assert batch.accuracy == [0.0, 1.0] and batch.num_errors == 1
    assert chaos_scorer.num_restarts == restarts


def test_single_worker_requeues_after_a_hang():
    with RewardScorer(_cfg(timeout_s=1.0, num_workers=1), verify_fn=CHAOS) as scorer:
        scorer.start(wait=True)
        t0 = time.monotonic()
        batch = scorer.score(
            [_resp("\\text{HANG}"), _resp("\\frac{1}{4}"), _resp("\\sqrt{4}")], ["\\pi", "0.25", "\\sqrt{4}"]
        )
        # the hang costs timeout_s, then the rest waits for the replacement's start-up (seconds; more under load)
        assert time.monotonic() - t0 < scorer.timeout_s + scorer.start_timeout_s
        assert batch.accuracy == [0.0, 1.0, 1.0] and batch.num_timeouts == 1


def test_batch_timeout_caps_a_call():
    cfg = _cfg(timeout_s=30.0, num_workers=2)
    with RewardScorer(cfg, verify_fn=CHAOS, batch_timeout_s=1.0) as scorer:
        scorer.start(wait=True)
        t0 = time.monotonic()
        hangs = [_resp(f"\\text{{HANG {k}}}") for k in range(3)]
        batch = scorer.score(hangs, ["\\pi"] * 3)
        assert time.monotonic() - t0 < 6.0  # vs >= 30 s (timeout_s) without the cap
        assert batch.num_timeouts == 3 and batch.accuracy == [0.0] * 3


def test_bad_verify_fn_is_reported():
    with RewardScorer(_cfg(), verify_fn="r1mega.rewards.math:no_such_function") as scorer:
        with pytest.raises(RuntimeError, match="no_such_function"):
            scorer.score([_resp("\\frac{1}{2}")], ["0.5"])


def test_inline_verification_without_workers():
    with RewardScorer(_cfg(), verify_fn=None) as scorer:
        batch = scorer.score([_resp("\\frac{1}{2}"), _resp("\\frac{1}{3}")], ["0.5", "0.5"])
        assert batch.accuracy == [1.0, 0.0] and scorer.num_live_workers == 0


def test_sixteen_distinct_pathological_answers_are_bounded_by_default():
    """Issue 14: 16 distinct power towers (sympy evaluates b^(b^b): hundreds of millions of digits) in one call took
    89 s with one worker, 16 x timeout_s, because reward.batch_timeout_s was unset. The default config now caps a
    call; the samples left count as timeouts and the scorer stays usable."""
    from r1mega.config import RewardConfig

    cfg = RewardConfig(num_workers=1)  # the embedded default's worker count (conf/config.yaml)
    assert cfg.batch_timeout_s is not None and cfg.batch_timeout_s < 16 * cfg.timeout_s
    towers = [_resp(f"{b}^{{{b}^{{{b}}}}}") for b in range(9, 25)]
    with RewardScorer(cfg) as scorer:
        scorer.start(wait=True)
        t0 = time.monotonic()
        batch = scorer.score(towers, ["\\frac{1}{2}"] * 16)
        elapsed = time.monotonic() - t0
        assert elapsed < cfg.batch_timeout_s + 5.0, elapsed  # vs 16 x 5 s + restarts without the cap
        assert batch.accuracy == [0.0] * 16 and batch.num_timeouts == 16 and batch.num_errors == 0
        verified = scorer.num_verified
        after = scorer.score([towers[0], _resp("\\frac{2}{4}")], ["\\frac{1}{2}", "\\frac{1}{2}"])
        assert after.accuracy == [0.0, 1.0] and after.num_timeouts == 1
        assert scorer.num_verified == verified + 1  # the tower's verdict is remembered, not re-run
