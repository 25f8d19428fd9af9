"""Qwen3 (dense): Llama with per-head RMSNorms on q and k (``q_norm`` / ``k_norm`` = megatron's
``qk_layernorm``) and a head dim decoupled from hidden / heads."""

from __future__ import annotations

from typing import Any

from r1mega.config import ModelConfig
from r1mega.model.families.llama import Llama


class Qwen3(Llama):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = {"Qwen3ForCausalLM": "qwen3"}
    qk_norm = True

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        kw = super().hf_config(m, arch)
        return {**kw, "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers}
