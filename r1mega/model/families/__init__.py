"""Model families: one module per Hugging Face family, behind one protocol (:class:`~.base.Family`) and a
registry keyed by the ``architectures`` entry of ``config.json``.

Each family holds its ``config.json`` <-> :class:`~r1mega.config.ModelConfig` mapping and its weight-name /
layout map in both directions (export to HF, load from HF). Adding a family = one module here + one line in
``_FAMILIES`` + its test (tests/test_hf_load.py builds a tiny random checkpoint from the transformers config
class and checks logits and the round trip).

Why our own adapters and not megatron-bridge: megatron-bridge 0.3.1 (the last release for megatron-core < 0.17)
was tried with our pins (megatron-core 0.16.1, transformers 5.24, CPU; ``pip install --no-deps
megatron-bridge==0.3.1`` into a throwaway target, 2026-12):
``from megatron.bridge import AutoBridge`` and every model bridge (``megatron.bridge.models.llama``) fail at
import with ``No module named 'transformer_engine'`` (``megatron/bridge/peft/lora_layers.py`` imports
``transformer_engine.pytorch`` unconditionally), so nothing converts on the CPU; it also pins transformers < 5,
Transformer Engine 2.10-2.12, mamba-ssm, causal-conv1d and nvidia-resiliency-ext, which we will not force on
users. mbridge is being deprecated. slime left both for its own loaders for the same reasons.
"""

from __future__ import annotations

from r1mega.config import ModelConfig
from r1mega.model.families.base import Family
from r1mega.model.families.deepseek_v3 import DeepseekV3
from r1mega.model.families.llama import Llama
from r1mega.model.families.qwen2 import Qwen2
from r1mega.model.families.qwen3 import Qwen3
from r1mega.model.families.qwen3_moe import Qwen3Moe

# order matters for ModelConfig -> architecture: the first family that claims a config wins
_FAMILIES: tuple[Family, ...] = (DeepseekV3(), Qwen3Moe(), Qwen3(), Qwen2(), Llama())
REGISTRY: dict[str, Family] = {arch: f for f in _FAMILIES for arch in f.architectures}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(REGISTRY)


def family_of(arch: str) -> Family:
    """The family of a ``config.json`` architecture; ValueError listing the supported ones otherwise."""
    if arch not in REGISTRY:
        raise ValueError(
            f"unsupported architecture {arch!r} (config.json 'architectures'); supported: {list(SUPPORTED_ARCHS)}"
        )
    return REGISTRY[arch]


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"config.json 'architectures'={archs!r}: expected exactly one of {list(SUPPORTED_ARCHS)}")
    family_of(archs[0])
    return archs[0]


def family_for(m: ModelConfig) -> tuple[Family, str]:
    """(family, architecture) that computes exactly what the megatron model of ``m`` computes.

    Raises ValueError naming the field when none does (e.g. the tiny_moe default: GQA attention with a
    sigmoid router and shared experts exists in no supported HF architecture).
    """
    if m.normalization != "RMSNorm" or m.activation != "swiglu":
        raise ValueError(
            f"normalization={m.normalization!r}, activation={m.activation!r}: HF export needs RMSNorm + swiglu"
        )
    if m.rotary_percent != 1.0:
        raise ValueError(f"rotary_percent={m.rotary_percent} is not supported by the HF export (only 1.0)")
    if not m.multi_latent_attention and m.position_embedding_type != "rope":
        raise ValueError(f"position_embedding_type={m.position_embedding_type!r}: only rope is exportable")
    for f in _FAMILIES:
        arch = f.architecture_for(m)
        if arch is not None:
            return f, arch
    raise ValueError(f"model {m.name!r} matches no supported HF architecture ({list(SUPPORTED_ARCHS)})")


__all__ = ["Family", "REGISTRY", "SUPPORTED_ARCHS", "architecture_of", "family_for", "family_of"]
