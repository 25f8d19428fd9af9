"""Hugging Face ``config.json`` -> our :class:`~r1mega.config.ModelConfig`, through the model families
(:mod:`r1mega.model.families`: one module per architecture family holds the mapping).

Anything the megatron model would silently compute differently from the Hugging Face one raises a ValueError
naming the field, instead of producing a plausible wrong model.

Deliberately ignored (not part of the policy's forward pass): ``num_nextn_predict_layers`` (DeepSeek-V3's
multi-token-prediction head, a pre-training auxiliary the RL policy neither needs nor loads),
``quantization_config`` (the storage format of the published weights, not the architecture), token ids,
dropout, ``ep_size`` / ``pretraining_tp`` (the authors' parallel layout) and the auxiliary-loss settings
(``aux_loss_alpha``, ``seq_aux``, ``router_aux_loss_coef``: training choices, set in our config).
"""

from __future__ import annotations

from typing import Any

from r1mega.config import ModelConfig
from r1mega.model.families import SUPPORTED_ARCHS, architecture_of, family_of

__all__ = ["SUPPORTED_ARCHS", "model_config_from_hf"]


def model_config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """Build the ModelConfig of a Hugging Face ``config.json`` (already parsed into a dict).

    Only the architecture is taken from ``hf``; the tokenizer, the checkpoint and the training knobs
    (load balancing, dispatcher, grouped GEMM) keep ModelConfig's defaults. Keys starting with ``_``
    (e.g. a fixture's ``_source``) are ignored. Raises ValueError naming the unsupported architecture
    or field.
    """
    arch = architecture_of(hf)
    return ModelConfig(name=name, **family_of(arch).config_from_hf(hf, arch))
