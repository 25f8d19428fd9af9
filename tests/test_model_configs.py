"""Real MoE architectures: conf/model/*.yaml == the published config.json, the megatron config they map to
has the published parameter counts, and a scaled-down copy of each builds and runs as a megatron GPTModel.

Fixtures: tests/fixtures/hf_configs/*.json (each names its source in ``_source``). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from r1mega.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from r1mega.model.hf_config import model_config_from_hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_configs"
NAMES = ["deepseek_v3", "deepseek_v2_lite", "moonlight_16b_a3b", "qwen3_30b_a3b"]
# ModelConfig fields that are not architecture: the yaml sets a placeholder tokenizer path
NOT_ARCHITECTURE = {"tokenizer", "checkpoint"}

# published sizes: (total, rtol, activated, rtol). DeepSeek-V2-Lite's total is exact: the parameter count
# of its (Chat) safetensors; the others are the model cards' rounded figures.
PUBLISHED = {
    "deepseek_v3": (671e9, 0.01, 37e9, 0.03),
    "deepseek_v2_lite": (15_706_484_224, 0.0, 2.4e9, 0.03),
    "moonlight_16b_a3b": (16e9, 0.03, 3e9, 0.05),
    "qwen3_30b_a3b": (30.5e9, 0.01, 3.3e9, 0.03),
}
# (MoE layers, full query/key head dim) each megatron config must end up with
DERIVED = {
    "deepseek_v3": (58, 192),
    "deepseek_v2_lite": (26, 192),
    "moonlight_16b_a3b": (26, 192),
    "qwen3_30b_a3b": (48, 128),
}


def load_yaml(name: str) -> ModelConfig:
    """conf/model/<name>.yaml merged into the typed schema (struct mode: an unknown key raises)."""
    node = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "r1mega" / "conf" / "model" / f"{name}.yaml")
    )
    return OmegaConf.to_object(node)


def load_hf(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def moe_pattern(tc) -> list[int]:
    """megatron's per-layer MoE pattern (int freq: every freq-th layer; list: explicit)."""
    if not tc.num_moe_experts:
        return [0] * tc.num_layers
    f = tc.moe_layer_freq
    return list(f) if isinstance(f, list) else [1 if i % f == 0 else 0 for i in range(tc.num_layers)]


def param_counts(tc, vocab: int, tied: bool) -> dict[str, int]:
    """Parameters of a megatron TransformerConfig, counted independently of megatron's modules.

    ``activated_hi`` counts every parameter a token touches; ``activated_lo`` leaves out the input
    embedding table (a lookup, not a matmul). Vendors differ on which they publish. ``expert_bias`` is
    DeepSeek's e_score_correction_bias: a parameter on Hugging Face, a buffer in megatron.
    """
    h, heads = tc.hidden_size, tc.num_attention_heads
    if getattr(tc, "multi_latent_attention", False):
        dn, dr, dv, kvr, qr = tc.qk_head_dim, tc.qk_pos_emb_head_dim, tc.v_head_dim, tc.kv_lora_rank, tc.q_lora_rank
        q = h * heads * (dn + dr) if qr is None else h * qr + qr * heads * (dn + dr) + (qr if tc.qk_layernorm else 0)
        kv = h * (kvr + dr) + kvr * heads * (dn + dv) + (kvr if tc.qk_layernorm else 0)
        attn = q + kv + heads * dv * h
    else:
        d, groups = tc.kv_channels, tc.num_query_groups or heads
        attn = h * heads * d + 2 * h * groups * d + heads * d * h + (2 * d if tc.qk_layernorm else 0)
    per_layer = attn + 2 * h  # + input and pre-MLP RMSNorms
    total = active = tc.num_layers * per_layer + h  # + final norm
    bias = 0
    for moe in moe_pattern(tc):
        if not moe:
            total += 3 * h * tc.ffn_hidden_size
            active += 3 * h * tc.ffn_hidden_size
            continue
        e, f, s = tc.num_moe_experts, tc.moe_ffn_hidden_size, tc.moe_shared_expert_intermediate_size or 0
        total += e * 3 * h * f + 3 * h * s + e * h  # routed experts, shared experts, router
        active += tc.moe_router_topk * 3 * h * f + 3 * h * s + e * h
        bias += e if tc.moe_router_enable_expert_bias else 0
    emb = vocab * h
    total += emb * (1 if tied else 2) + bias
    active += emb * (1 if tied else 2) + bias
    return dict(total=total, activated_hi=active, activated_lo=active - emb, expert_bias=bias)


# ------------------------------------------------------------------------------------- (a) yaml == hf


@pytest.mark.parametrize("name", NAMES)
def test_yaml_matches_published_config(name):
    ours = load_yaml(name)
    theirs = model_config_from_hf(load_hf(name), name)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in NOT_ARCHITECTURE:
            assert getattr(ours, f.name) == getattr(theirs, f.name), f"{name}: {f.name}"
    assert ours.tokenizer.startswith("/path/to/"), "placeholder tokenizer path expected"
    validate(Config(model=ours))


def test_fixtures_name_their_source():
    for name in NAMES:
        assert load_hf(name)["_source"].strip(), name


def test_hf_mapping_details():
    v3, lite = (
        model_config_from_hf(load_hf("deepseek_v3"), "v3"),
        model_config_from_hf(load_hf("deepseek_v2_lite"), "l"),
    )
    qwen, moon = (
        model_config_from_hf(load_hf("qwen3_30b_a3b"), "q"),
        model_config_from_hf(load_hf("moonlight_16b_a3b"), "m"),
    )
    assert (v3.moe_shared_expert_intermediate_size, lite.moe_shared_expert_intermediate_size) == (2048, 2 * 1408)
    assert (v3.qk_head_dim, v3.qk_pos_emb_head_dim, v3.v_head_dim, v3.q_lora_rank) == (128, 64, 128, 1536)
    assert lite.q_lora_rank is None and lite.moe_router_pre_softmax and not qwen.moe_router_pre_softmax
    assert (v3.moe_router_num_groups, v3.moe_router_group_topk, v3.moe_router_topk_scaling_factor) == (8, 4, 2.5)
    assert moon.rope_type == "rope" and moon.rotary_base == 50000.0 and moon.moe_router_enable_expert_bias
    assert (qwen.num_query_groups, qwen.kv_channels, qwen.qk_layernorm, qwen.first_k_dense_layers) == (4, 128, True, 0)


def test_dense_qwen3():
    # Qwen/Qwen3-8B config.json, as quoted in github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md
    hf = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 40960,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    m = model_config_from_hf(hf, "qwen3_8b")
    assert not m.is_moe and (m.num_query_groups, m.kv_channels, m.qk_layernorm) == (8, None, True)
    assert (m.ffn_hidden_size, m.rotary_base, m.multi_latent_attention) == (12288, 1e6, False)
    validate(Config(model=m))


@pytest.mark.parametrize(
    "base, change, match",
    [
        ("deepseek_v3", {"architectures": ["MixtralForCausalLM"]}, "unsupported architecture 'MixtralForCausalLM'"),
        ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("deepseek_v3", {"topk_group": 2}, "group-limited routing"),
        ("deepseek_v2_lite", {"n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy"}, "group-limited"),
        ("deepseek_v2_lite", {"topk_method": "noaux_tc"}, "noaux_tc"),
        ("deepseek_v2_lite", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
        ("deepseek_v2_lite", {"moe_layer_freq": 2}, "moe_layer_freq"),
        ("qwen3_30b_a3b", {"mlp_only_layers": [3, 7]}, "mlp_only_layers"),
        ("qwen3_30b_a3b", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen3_30b_a3b", {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "sliding"),
        ("qwen3_30b_a3b", {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3"}}, "llama3"),
        ("qwen3_30b_a3b", {"attention_bias": True}, "attention_bias"),
        ("qwen3_30b_a3b", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_fields_are_named(base, change, match):
    with pytest.raises(ValueError, match=match):
        model_config_from_hf({**load_hf(base), **change}, "x")


def test_leading_dense_layers_from_mlp_only_layers():
    m = model_config_from_hf({**load_hf("qwen3_30b_a3b"), "mlp_only_layers": [1, 0]}, "x")
    assert m.first_k_dense_layers == 2


# ------------------------------------------------------------------ (b) megatron config, parameter counts


@pytest.mark.parametrize("name", NAMES)
def test_megatron_config_has_published_size(name):
    from r1mega.model.builder import transformer_config

    model = load_yaml(name)
    tc = transformer_config(model, ParallelConfig(), TrainConfig(), on_gpu=False)
    moe_layers, qk_dim = DERIVED[name]
    assert sum(moe_pattern(tc)) == moe_layers
    assert moe_pattern(tc)[: model.first_k_dense_layers] == [0] * model.first_k_dense_layers
    if model.multi_latent_attention:
        assert type(tc).__name__ == "MLATransformerConfig"
        assert tc.qk_head_dim + tc.qk_pos_emb_head_dim == qk_dim
    else:
        assert tc.kv_channels == qk_dim and tc.num_query_groups == model.num_query_groups

    counts = param_counts(tc, model.vocab_size, model.tie_embeddings)
    total, t_tol, activated, a_tol = PUBLISHED[name]
    assert counts["total"] == pytest.approx(total, rel=t_tol, abs=0), counts
    assert counts["activated_lo"] * (1 - a_tol) <= activated <= counts["activated_hi"] * (1 + a_tol), counts


# ---------------------------------------------------------------- (c) scaled-down copies, one forward each


def shrink(m: ModelConfig) -> ModelConfig:
    """The same architecture at toy size: MLA/GQA, q compression, qk norms, shared experts, leading dense
    layers, router (score function, pre-softmax, expert bias, groups, scaling) and rope kind are kept."""
    r = dict(
        num_layers=min(m.first_k_dense_layers, 1) + 2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2 if m.num_query_groups else None,
        kv_channels=32 if m.kv_channels else None,  # decoupled head dim, like Qwen3's 128 vs 2048 / 32
        ffn_hidden_size=128,
        max_position_embeddings=64,
        first_k_dense_layers=min(m.first_k_dense_layers, 1),
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_router_dtype=None,
        moe_grouped_gemm=False,
    )
    if m.moe_shared_expert_intermediate_size:
        r["moe_shared_expert_intermediate_size"] = 32 * (m.moe_shared_expert_intermediate_size // m.moe_ffn_hidden_size)
    if m.moe_router_num_groups:  # keep DeepSeek-V3's topk // group_topk == 2 (top-2 sum per group)
        r.update(moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=4)
    else:
        r["moe_router_topk"] = 2
    if m.multi_latent_attention:
        r.update(
            q_lora_rank=32 if m.q_lora_rank else None,
            kv_lora_rank=32,
            qk_head_dim=16,
            qk_pos_emb_head_dim=8,
            v_head_dim=16,
        )  # v != qk + pos, as in the real models (128 vs 192)
    return dataclasses.replace(m, **r)


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy matmuls: one thread is enough, and the CPU is shared
    rt = init_runtime(ParallelConfig(), seed=0, device="cpu")
    yield rt
    shutdown_runtime()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_scaled_down_model_forward(runtime, name):
    from megatron.core.transformer.identity_op import IdentityOp

    from r1mega.model.builder import build_gpt_model, transformer_config

    real = load_yaml(name)
    tiny = shrink(real)
    validate(Config(model=tiny))
    gpt = build_gpt_model(tiny, ParallelConfig(), TrainConfig(), vocab_size=128, device=torch.device("cpu")).eval()

    # the structure is the real one
    layers = gpt.decoder.layers
    assert len(layers) == tiny.num_layers
    for i, layer in enumerate(layers):
        dense = i < tiny.first_k_dense_layers
        assert type(layer.mlp).__name__ == ("MLP" if dense else "MoELayer"), (i, type(layer.mlp))
        attn = layer.self_attention
        if real.multi_latent_attention:
            assert type(attn).__name__ == "MLASelfAttention"
            assert hasattr(attn, "linear_q_proj") == (real.q_lora_rank is None)
            assert not isinstance(attn.kv_layernorm, IdentityOp)
        else:
            assert not isinstance(attn.q_layernorm, IdentityOp) and not isinstance(attn.k_layernorm, IdentityOp)
        if not dense:
            assert (layer.mlp.shared_experts is not None) == bool(real.moe_shared_expert_intermediate_size)
            router = layer.mlp.router
            assert router.score_function == real.moe_router_score_function
            assert (router.expert_bias is not None) == real.moe_router_enable_expert_bias
    tc = transformer_config(tiny, ParallelConfig(), TrainConfig(), on_gpu=False)
    counts = param_counts(tc, 128, tiny.tie_embeddings)
    assert sum(p.numel() for p in gpt.parameters()) == counts["total"] - counts["expert_bias"]

    # one causal forward
    s = 12
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, s), generator=gen)
    pos = torch.arange(s).unsqueeze(0).expand(2, s)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    with torch.no_grad():
        logits = gpt(tokens, pos, mask)
        assert logits.shape == (2, s, 128) and torch.isfinite(logits).all()
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 128
        again = gpt(changed, pos, mask)
    torch.testing.assert_close(again[:, :-1], logits[:, :-1])  # the future does not leak into the past
    assert not torch.allclose(again[:, -1], logits[:, -1])
