"""Tiny random Hugging Face checkpoints of every supported family, built from the transformers config classes
and saved with safetensors at test time (nothing is downloaded), and helpers to compare logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 100  # not a multiple of 64 or of the TP size: megatron pads it (the padded rows must be cut away)
SEQ = 12
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
    tie_word_embeddings=False, rope_theta=10000.0,
)  # fmt: skip
MOE = dict(num_hidden_layers=4, moe_intermediate_size=32, num_experts_per_tok=2)
SPECS = {
    "llama": ("LlamaConfig", dict(COMMON, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(COMMON)),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, **MOE, num_experts=4, norm_topk_prob=True, mlp_only_layers=[0])),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            COMMON, **MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4,
        ),
    ),
    # DeepSeek-V2-Lite's shape: no q_lora, softmax router (pre-softmax top-k, unnormalised), 2 shared experts
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            COMMON, **MOE, n_routed_experts=4, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy",
            norm_topk_prob=False, num_key_value_heads=4,
        ),
    ),
}  # fmt: skip
FAMILIES = list(SPECS)


def save_tiny(name: str, path: Path, shards: int = 1, **over) -> Path:
    """A random ``name`` model saved at ``path``; norms, biases and the expert bias moved off their init
    (1, 0, 0) so that a misplaced one shows in the logits."""
    import transformers

    cls, kw = SPECS[name]
    cfg = getattr(transformers, cls)(**{**kw, **over})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    size = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(path, max_shard_size=size // shards + 1 if shards > 1 else "5GB")
    return path


def hf_model(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # transformers builds DeepSeek's latent norms with eps 1e-6 whatever rms_norm_eps says; megatron uses it
    for n, mod in model.named_modules():
        if n.endswith(("q_a_layernorm", "kv_a_layernorm")):
            mod.variance_epsilon = model.config.rms_norm_eps
    return model


def hf_logits(path: Path, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(toks).logits


def tokens(vocab: int = VOCAB, b: int = 2, s: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))


def megatron_logits(gpt, toks: torch.Tensor) -> torch.Tensor:
    """The local shard of the logits [b, s, padded vocab / tp] (last pipeline stage) or the hidden states."""
    b, s = toks.shape
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    with torch.no_grad():
        return gpt(toks, torch.arange(s).unsqueeze(0).expand(b, s), mask)


def config_json(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def truncate_hf(src: Path, dst: Path, layers: int) -> Path:
    """The first ``layers`` decoder layers of the HF folder ``src`` (+ embedding, final norm, tokenizer) at ``dst``:
    real weights at a fraction of the cost, for tests that train."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    cfg = config_json(src)
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg))
    keep = {}
    for f in src.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers:
                    keep[k] = h.get_tensor(k)
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
