"""Qwen3 (dense): Llama with per-head RMSNorms on q and k (``q_norm`` / ``k_norm`` = megatron's
``qk_layernorm``) and a head dim decoupled from hidden / heads."""

from __future__ import annotations

from r1mega.model.families.qwen2 import QwenDense


class Qwen3(QwenDense):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = {"Qwen3ForCausalLM": "qwen3"}
    qk_norm = True
