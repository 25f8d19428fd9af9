"""Llama (SmolLM2, Llama-2, Llama-3 8B/70B): rotary GQA attention, SwiGLU, RMSNorm, optional tied embeddings.

Llama-3.1+'s ``rope_type: llama3`` frequency scaling is refused (ModelConfig has no field for it yet).
"""

from __future__ import annotations

from typing import Any, Optional

from r1mega.config import ModelConfig
from r1mega.model.families.base import Family, Layout, dense_gqa, gqa_from_hf, gqa_hf_config, gqa_layouts


class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = {"LlamaForCausalLM": "llama"}
    qk_norm = False
    qkv_bias = False

    def config_from_hf(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        kw = self.common_from_hf(hf, arch)
        kw.update(gqa_from_hf(hf, qk_norm=self.qk_norm), add_qkv_bias=self.qkv_bias, num_experts=None)
        return kw

    def architecture_for(self, m: ModelConfig) -> Optional[str]:
        return self.architectures[0] if dense_gqa(m, self.qk_norm, self.qkv_bias) else None

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        return {**gqa_hf_config(m), "mlp_bias": False}

    def layer_layouts(self, m: ModelConfig, arch: str) -> dict[str, Layout]:
        return {**super().layer_layouts(m, arch), **gqa_layouts(m)}
