"""Qwen2 / Qwen2.5 (dense): Llama with biases on the q / k / v projections (hard-coded in transformers' Qwen2,
no config switch), megatron's ``add_qkv_bias``. Sliding-window attention is refused (full causal only)."""

from __future__ import annotations

from typing import Any

from r1mega.config import ModelConfig
from r1mega.model.families.llama import Llama


class QwenDense(Llama):
    """What Qwen2 and Qwen3 add to Llama's config.json: sliding-window keys, written as off."""

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        kw = super().hf_config(m, arch)
        return {**kw, "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers}


class Qwen2(QwenDense):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = {"Qwen2ForCausalLM": "qwen2"}
    qkv_bias = True
