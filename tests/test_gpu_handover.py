"""The hand-over of a colocated engine's GPU memory (r1mega/memory.py: GpuHandover) on a simulated 80 GB device:
the bytes SGLang releases are what it is owed; a resume that cannot fit is a MemoryError naming the settings
before SGLang is asked (on the GPU it would crash its scheduler and the job, as on the H100 of 2026-12-06), and
the engine's state stays consistent so that the same resume succeeds once the memory is there."""

from __future__ import annotations

import pytest

import r1mega.memory as memory
from r1mega.data.tokenizer import CharTokenizer
from r1mega.memory import GpuHandover
from r1mega.rollout.base import SamplingParams
from tests.test_sglang_engine import TAGS, FakeEngine, install_fake_sglang, make_policy, runtime, small_config

GiB = 1 << 30
__all__ = ["runtime"]  # the 1-rank gloo runtime fixture of test_sglang_engine


def test_handover_accounting_and_refusal():
    device = {"free": 10 * GiB}
    resumed: list[int] = []

    def release() -> None:
        device["free"] += 40 * GiB

    def resume() -> None:
        device["free"] -= 40 * GiB
        resumed.append(1)

    h = GpuHandover("engine x", "Lower x.share.", free_bytes=lambda: device["free"])
    h.release(release)
    assert h.owed == 40 * GiB
    h.resume(resume)
    assert h.owed == 0 and resumed == [1] and device["free"] == 10 * GiB
    h.release(release)
    device["free"] -= 35 * GiB  # the trainer grew into the engine's share: 15 GiB free, 40 owed
    with pytest.raises(MemoryError, match=r"engine x: .* needs 42\.95 GB .* 16\.11 GB free .* Lower x\.share\."):
        h.resume(resume)
    assert resumed == [1] and h.owed == 40 * GiB  # the engine was not asked
    device["free"] += 35 * GiB
    h.resume(resume)
    assert h.owed == 0 and resumed == [1, 1]


def test_handover_on_the_cpu_measures_nothing():
    h = GpuHandover("engine x", "fix", free_bytes=lambda: None)
    calls: list[str] = []
    h.release(lambda: calls.append("release"))
    h.resume(lambda: calls.append("resume"))
    assert calls == ["release", "resume"] and h.owed == 0


def test_sglang_resume_that_cannot_fit_names_the_settings(runtime, monkeypatch):
    """SGLang's tags on an 80 GB card (weights 1, KV cache 35, CUDA graphs 4 GiB) next to a trainer of 10 GiB; the
    trainer's peak then grows to 45 GiB: the next resume of the KV cache and graphs refuses before SGLang is asked."""
    install_fake_sglang(monkeypatch)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    sizes = {"weights": 1 * GiB, "kv_cache": 35 * GiB, "cuda_graph": 4 * GiB}
    trainer = {"bytes": 10 * GiB}

    def free() -> int:
        held = sum(v for t, v in sizes.items() if t not in FakeEngine.instances[-1].offloaded)
        return 80 * GiB - trainer["bytes"] - held

    monkeypatch.setattr(memory, "device_free_bytes", free)
    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok, bucket_bytes=24 << 10)
    try:
        fake = FakeEngine.instances[-1]
        assert fake.offloaded == TAGS and engine._handover.owed == 40 * GiB
        engine.resume_memory()
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=4))
        assert engine._handover.owed == 0
        engine.release_memory()
        trainer["bytes"] = 45 * GiB
        engine.update_weights(policy)  # the weights alone (1 GiB): not checked, their share is not known
        assert fake.offloaded == {"kv_cache", "cuda_graph"} and engine._handover.owed == 39 * GiB
        start = len(fake.calls)
        with pytest.raises(MemoryError, match=r"rollout=sglang: .* needs 41\.88 GB .* 36\.51 GB free .* rollout\.mem_"):
            engine.resume_memory()
        assert fake.calls[start:] == [] and fake.offloaded == {"kv_cache", "cuda_graph"}  # SGLang was not asked
        trainer["bytes"] = 10 * GiB  # e.g. after train.max_tokens_per_microbatch
        engine.resume_memory()
        out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=4))
        assert len(out) == 1 and engine._handover.owed == 0 and not fake.offloaded
    finally:
        engine.shutdown()
