"""tools/compare_trainer_engine.py measures what the GRPO step sees (the trainer's alignment metrics, greedy
agreement, the push) on the trainer's own engines. On the CPU the candidate is the megatron engine itself, so
every gap must be zero and every greedy answer equal, before and after the weight change; on the H200 the
candidate is SGLang (docs/perf/sglang.md)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
pytest.importorskip("transformers")
import compare_trainer_engine as cte  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_megatron_against_itself(family, smollm2, tmp_path):
    overrides = ["data.template=chat"] + (["rollout.routing_replay=true"] if family != "llama" else [])
    args = argparse.Namespace(hf_dir=None, family=family, tokenizer_from=smollm2, wide=False, engine="megatron",
                              prompts=2, new_tokens=4, bench_gen=False, group=2, json=tmp_path / "s.json",
                              floor=family == "llama", overrides=overrides)  # fmt: skip
    s = cte.run(args)
    for tag in ("same_weights", "after_push"):
        r = s[tag]
        assert r["tokens"] == 8 and r["logp_diff_max"] < 1e-4, r
        assert 1.0 <= r["token_mult_prob_error"] < 1.0001
        assert r["greedy_equal"] == r["greedy_prompts"] == 2
        if family == "llama":  # --floor: fp32 on both sides of this CPU run, so the fp32 forward is the same one
            assert r["fp32_gap_engine_max"] < 1e-4 and r["fp32_gap_trainer_max"] < 1e-4
        if family == "qwen3_moe":  # R3: the gap with the candidate's experts replayed is measured beside
            assert r["r3_logp_diff_max"] < 1e-4
    assert (tmp_path / "s.json").exists()


def test_sglang_path_runs_against_a_fake_sglang(smollm2, tmp_path, monkeypatch, request):
    """The SGLang side of the tool (push, release / resume, the standalone-engine benchmark) on the fake ``sglang``
    of tests/test_sglang_engine.py: its answers and log-probs are made up, so only the plumbing is checked. Both
    engines' shutdowns stay confined to their own processes: an unconfined one here killed megatron's checkpoint
    results queue (a Manager process of pytest's), and every later checkpoint save in CI failed on a broken pipe."""
    from tests.test_sglang_engine import FakeEngine, install_fake_sglang

    install_fake_sglang(monkeypatch)
    monkeypatch.setattr(FakeEngine, "spawn_scheduler", True)
    bystander = subprocess.Popen(["sleep", "120"])  # a child of the caller SGLang did not start
    request.addfinalizer(bystander.kill)
    args = argparse.Namespace(hf_dir=None, family="llama", tokenizer_from=smollm2, wide=False, engine="sglang",
                              prompts=2, new_tokens=4, bench_gen=True, group=2, gen_tokens=4, json=None, floor=False,
                              overrides=["data.template=chat"])  # fmt: skip
    s = cte.run(args)
    assert s["push"]["push/bytes"] > 0 and s["push"]["push/buckets"] >= 1
    for tag in ("same_weights", "after_push"):
        assert s[tag]["greedy_prompts"] == 2 and s[tag]["tokens"] > 0
        assert s[tag]["prefill_vs_decode_max"] >= s[tag]["prefill_vs_decode_mean"] > 0  # the fake's made-up values
    b = s["bench_gen"]
    assert b["requests"] == 4 and b["ours_tok_s"] > 0 and b["standalone_tok_s"] > 0
    ours, standalone = FakeEngine.instances[0], FakeEngine.instances[-1]
    assert ours.kwargs["load_format"] == "dummy" and standalone.kwargs["model_path"] != ours.kwargs["model_path"]
    assert "enable_memory_saver" not in standalone.kwargs and standalone.kwargs["port"] == ours.kwargs["port"] + 50
    assert bystander.poll() is None and not any(psutil.pid_exists(e.scheduler.pid) for e in FakeEngine.instances)


def test_bf16_floor_tool(smollm2, tmp_path):
    """tools/bf16_floor.py on a tiny random Llama: each of the five pairs is measured, and every bf16 forward is off
    the fp32 one (and the two bf16 ones off each other) by a small, non-zero amount."""
    import bf16_floor
    from compare_engines import make_tiny_hf

    hf = make_tiny_hf("llama", tmp_path / "llama", tokenizer_from=smollm2)
    out = bf16_floor.measure(hf, prompts=2, split=30)
    for mean, mx in out.values():
        assert 0.0 < mean <= mx < 1.0
    assert len(out) == 5
