"""The SGLang weight push: bucket planning as a pure function (sizes, one dtype per bucket, MLA pairs and a
layer's experts kept together), the flattened-bucket push through the fake ``sglang`` (what SGLang loads equals
the export; per-push metrics), the read-back verification, the Qwen3-MoE dense-layer guard, the SGLang knobs and
the routed-experts return."""

from __future__ import annotations

import pytest
import torch

from r1mega.data.tokenizer import CharTokenizer
from r1mega.model.hf_export import export_hf, iter_hf_groups
from r1mega.rollout.base import SamplingParams
from r1mega.rollout.weight_push import plan_buckets
from tests.test_sglang_engine import FakeEngine, install_fake_sglang, make_policy, small_config


@pytest.fixture
def fake(monkeypatch):
    install_fake_sglang(monkeypatch)


def _nbytes(bucket):
    return sum(t.numel() * t.element_size() for _, t in bucket)


def test_plan_buckets(runtime):
    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    groups = list(iter_hf_groups(policy.model, cfg.model, tok.vocab_size, torch.bfloat16))
    names = [n for g in groups for n, _ in g]
    assert any(t.dtype == torch.float32 for g in groups for _, t in g), "e_score_correction_bias stays fp32"
    limit = 40 << 10
    buckets = list(plan_buckets(iter(groups), limit))
    planned = [n for b in buckets for n, _ in b]
    assert sorted(planned) == sorted(names) and len(planned) == len(names)  # every tensor exactly once
    where = {n: i for i, b in enumerate(buckets) for n, _ in b}
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
    experts = {}
    for n in names:
        if ".mlp.experts." in n:
            experts.setdefault(n.split(".mlp.experts.")[0], set()).add(where[n])
        if n.endswith("q_a_proj.weight"):
            assert where[n] == where[n.replace("q_a_proj", "kv_a_proj_with_mqa")]
    assert experts and all(len(v) == 1 for v in experts.values()), "a layer's experts travel in one bucket"
    for b in buckets:  # over the limit only when one unit (a layer's experts, or one tensor) is larger by itself
        if _nbytes(b) > limit:
            prefixes = {n.split(".mlp.experts.")[0] if ".mlp.experts." in n else n for n, _ in b}
            assert len(prefixes) == 1, [n for n, _ in b]
    assert len(buckets) > 3


def test_flattened_push_loads_the_export_and_reports(runtime, fake):
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok, bucket_bytes=40 << 10)
    f = FakeEngine.instances[-1]
    engine.update_weights(policy)
    whole = dict(export_hf(policy.model, cfg.model, tok.vocab_size))
    torch.testing.assert_close(f.loaded, whole)
    m = engine.last_push_metrics
    assert m["push/bytes"] == sum(t.numel() * t.element_size() for t in whole.values())
    assert m["push/tensors"] == len(whole) and m["push/buckets"] == len(f.buckets)
    assert m["push/seconds"] > 0 and m["push/gb_per_s"] > 0
    assert all(m[f"push/{k}_s"] >= 0 for k in ("gather", "convert", "ipc_load", "verify"))
    assert m["push/seconds"] >= m["push/gather_s"] + m["push/convert_s"] + m["push/ipc_load_s"] - 1e-6
    # DeepSeek-V3 is not readable through get_weights_by_name in SGLang 0.5.17: no read-back was tried
    assert "get_weights" not in [c[0] for c in f.calls]
    engine.shutdown()


def _llama_config():
    cfg = small_config()
    m = cfg.model
    m.num_experts, m.multi_latent_attention, m.qk_layernorm, m.first_k_dense_layers = None, False, False, 0
    return cfg


def test_push_verification(runtime, fake):
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = _llama_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok, bucket_bytes=40 << 10)
    f = FakeEngine.instances[-1]
    engine.update_weights(policy)  # first push: read back and equal
    reads = [c[1] for c in f.calls if c[0] == "get_weights"]
    assert len(reads) >= 3 and "model.embed_tokens.weight" in reads

    victim = "model.layers.0.self_attn.o_proj.weight"
    f.drop, f.loaded = {victim}, {}  # an SGLang that has no parameter for it: the push must not pass silently
    cfg.rollout.bucket_mb, engine.bucket_bytes = 1, 1  # one tensor per bucket: the victim is sampled
    cfg.rollout.verify_push_every = 1  # every push read back (the default reads back only the first)
    with pytest.raises(RuntimeError, match=victim.replace(".", r"\.")):
        engine.update_weights(policy)
    engine.shutdown()

    cfg.rollout.verify_push_every = 0  # the default: the first push is read back, later ones are not (~2 s each)
    engine = SGLangRolloutEngine(cfg, policy, tok)
    engine.update_weights(policy)
    calls = FakeEngine.instances[-1].calls
    first = sum(c[0] == "get_weights" for c in calls)
    engine.update_weights(policy)
    assert first >= 1 and sum(c[0] == "get_weights" for c in calls) == first
    engine.shutdown()
    cfg.rollout.verify_push_every = 2  # and every 2nd push after it
    engine = SGLangRolloutEngine(cfg, policy, tok)
    calls = FakeEngine.instances[-1].calls
    counts = []
    for _ in range(3):
        engine.update_weights(policy)
        counts.append(sum(c[0] == "get_weights" for c in calls))
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == 2 * counts[0]
    engine.shutdown()


def test_qwen3_moe_with_dense_layer_is_refused(runtime, fake):
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    m = cfg.model
    m.multi_latent_attention, m.moe_router_score_function, m.moe_router_enable_expert_bias = False, "softmax", False
    m.moe_shared_expert_intermediate_size, m.qk_layernorm, m.first_k_dense_layers = None, True, 1
    with pytest.raises(ValueError, match="first_k_dense_layers=1.*Qwen3-MoE layer sparse"):
        SGLangRolloutEngine(cfg, None, tok)
    assert not FakeEngine.instances, "refused before SGLang starts"


def test_on_policy_target_mode_with_an_fp32_head_is_refused(runtime, fake):
    """SGLang's rl_on_policy_target returns log-probs of bf16-rounded logits: with the trainer's fp32 head that is a
    contradiction, refused before SGLang starts; with bf16 heads on both sides it is the user's experiment."""
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    cfg.rollout.server_args = {"rl_on_policy_target": "fsdp"}
    cfg.train.fp32_lm_head = True
    with pytest.raises(ValueError, match="rl_on_policy_target with train.fp32_lm_head=true"):
        SGLangRolloutEngine(cfg, None, tok)
    assert not FakeEngine.instances
    cfg.train.fp32_lm_head = False
    engine = SGLangRolloutEngine(cfg, make_policy(cfg, tok), tok)
    assert FakeEngine.instances[-1].kwargs["rl_on_policy_target"] == "fsdp"
    engine.shutdown()


def test_knobs_and_routed_experts(runtime, fake):
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    cfg.rollout.routing_replay, cfg.rollout.chunked_prefill_size = True, 4096
    cfg.rollout.server_args = {"triton_attention_num_kv_splits": 16, "mem_fraction_static": 0.25}  # win, last
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok)
    kw = FakeEngine.instances[-1].kwargs
    assert kw["disable_cuda_graph"] is False and kw["attention_backend"] == "triton"  # CUDA graphs on by default
    assert kw["disable_prefill_cuda_graph"] is True  # but not the start-up capture of ~58 prefill graphs
    assert "cuda_graph_max_bs_decode" not in kw  # SGLang's own choice unless rollout.cuda_graph_max_bs is set
    assert "cuda_graph_bs_decode" not in kw  # and its own list of sizes unless rollout.cuda_graph_bs is set
    assert kw["triton_attention_num_kv_splits"] == 16 and kw["mem_fraction_static"] == 0.25
    assert kw["chunked_prefill_size"] == 4096 and kw["enable_return_routed_experts"] is True
    engine.resume_memory()
    prompts = [[1, 2, 3], [4, 5]]
    rolls = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    for p, r in zip(prompts, rolls):
        n = len(p) + len(r.response_ids) - 1
        want = (torch.arange(n * 3 * 2) % 4).reshape(n, 3, 2)
        assert torch.equal(r.routed_experts, want)  # SGLang's [seq - 1, num_hidden_layers, topk], decoded
    engine.shutdown()


def test_cuda_graph_batch_sizes(runtime, fake):
    """rollout.cuda_graph_bs -> SGLang's cuda_graph_bs_decode (sorted, unique); with cuda_graph_max_bs too it is
    refused (the list's largest size is the max), and so is an empty or non-positive list."""
    from r1mega.config import ConfigError, SGLangRolloutConfig
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    cfg.rollout.cuda_graph_bs = [64, 1, 8, 8, 1024]
    engine = SGLangRolloutEngine(cfg, make_policy(cfg, tok), tok)
    assert FakeEngine.instances[-1].kwargs["cuda_graph_bs_decode"] == [1, 8, 64, 1024]
    engine.shutdown()
    with pytest.raises(ConfigError, match="rollout.cuda_graph_bs and rollout.cuda_graph_max_bs are both set"):
        SGLangRolloutConfig(cuda_graph_bs=[1, 2], cuda_graph_max_bs=256)
    for bad in ([], [0, 4]):
        with pytest.raises(ConfigError, match="rollout.cuda_graph_bs=.*positive"):
            SGLangRolloutConfig(cuda_graph_bs=bad)
