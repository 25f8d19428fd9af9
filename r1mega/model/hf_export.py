"""megatron-core GPTModel -> Hugging Face checkpoint names and layouts (the weight push to SGLang).

Two functions:

- :func:`hf_config_from_model_config`: our :class:`~r1mega.config.ModelConfig` -> a ``config.json`` dict, the
  inverse of :func:`r1mega.model.hf_config.model_config_from_hf` (round-trips the conf/model/*.yaml files).
- :func:`export_hf` / :func:`iter_hf_buckets`: the policy's parameters under the names and layouts of the
  Hugging Face *checkpoint* format (per-expert ``mlp.experts.{e}.gate_proj.weight``, not transformers-5's
  fused in-memory experts), which is what both ``transformers.from_pretrained`` and SGLang's ``load_weights``
  read.

Architectures and layouts (fused QKV per query group, SwiGLU [gate; up], MLA renames, experts, the router bias,
the padded vocab) live in the model families (:mod:`r1mega.model.families`); this module is the gather
machinery. Proven on CPU against the transformers classes (logits equal to ~1e-5, fp32): tests/test_hf_export.py.

Parallel layouts and the gather strategy (collective: every rank of the model must iterate the same
generator in lock-step; the tensors come out whole on every rank of the TP / EP groups):

- TP: a parameter that megatron marks ``tensor_model_parallel`` is all-gathered over its TP group along its
  ``partition_dim`` (expert weights over the expert-TP group); replicated ones (norms, router, MLA
  down-projections, expert bias) are taken as they are. One parameter at a time, so the peak extra memory
  is one full parameter (the embedding, 1.9 GB bf16 for DeepSeek-V3) plus the caller's bucket.
- EP: each rank converts its local experts; expert slot j is all-gathered over the EP group, giving global
  experts ``r * num_local_experts + j`` for every EP rank r -- one expert tensor per EP rank at a time.
- PP: each stage exports only its own layers, named with their global layer number
  (``layer.layer_number - 1``); the embedding / final norm / lm_head come from the first / last stage.
  Bringing stages together is the caller's business (the SGLang engine refuses PP > 1 for now).
Nothing materialises the whole model on one device: :func:`iter_hf_buckets` groups the stream into
buckets of about ``bucket_bytes``.

Supported megatron names: the local spec (``input_layernorm``, ``pre_mlp_layernorm``, ``linear_qkv``,
``q_layernorm``/``k_layernorm``/``kv_layernorm``, ``mlp.experts.local_experts.{j}.linear_fc1``,
``mlp.shared_experts.*``, ``mlp.router.*``) and the Transformer Engine spec (fused
``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, ``linear_q_up_proj.layer_norm_weight``,
``linear_kv_up_proj.layer_norm_weight``, grouped experts ``mlp.experts.linear_fc1.weight{j}``). Anything
else (legacy GroupedMLP ``weight1``, a shared-expert gate, biases, MTP layers) raises ValueError, so a
spec change cannot silently drop a weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1mega.config import ModelConfig
from r1mega.model.families import family_for
from r1mega.model.families.base import Named
from r1mega.model.families.weight_map import WeightMap

# ============================================================================================ config.json


def hf_architecture(m: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what our megatron model computes.

    Raises ValueError naming the field when none does (e.g. the tiny_moe default: GQA attention with a
    sigmoid router and shared experts exists in no supported HF architecture).
    """
    return family_for(m)[1]


def hf_config_from_model_config(
    m: ModelConfig,
    vocab_size: int,
    *,
    dtype: str = "bfloat16",
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
) -> dict[str, Any]:
    """``config.json`` (as a dict) of the HF model equal to ``m``: the inverse of ``model_config_from_hf``.

    ``vocab_size`` is the real (tokenizer) vocab, not megatron's padded one. Rope is written in the
    legacy ``rope_theta`` + ``rope_scaling`` form, which transformers 4 and 5 and SGLang all read.
    """
    family, arch = family_for(m)
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type=family.model_types[arch],
        vocab_size=int(vocab_size),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base,
        rope_scaling=None,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_method_std,
        torch_dtype=dtype,
        use_cache=True,
    )
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    hf.update(family.hf_config(m, arch))
    return hf


# ============================================================================================ weights


class _Groups:
    """The process groups of the export (None where a dimension is 1 or torch.distributed is off)."""

    def __init__(self) -> None:
        self.tp = self.etp = self.ep = None
        self.ep_rank = 0
        if not (dist.is_available() and dist.is_initialized()):
            return
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return
        big = lambda g: g if g is not None and dist.get_world_size(g) > 1 else None  # noqa: E731
        self.tp = big(ps.get_tensor_model_parallel_group(check_initialized=False))
        self.etp = big(ps.get_expert_tensor_parallel_group(check_initialized=False))
        self.ep = big(ps.get_expert_model_parallel_group(check_initialized=False))
        self.ep_rank = dist.get_rank(self.ep) if self.ep is not None else 0


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _cat_shards(shards: list[torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """Concatenate TP shards; a SwiGLU fc1 shard is [gate_r; up_r], so gates and ups are joined apart."""
    if len(shards) == 1:
        return shards[0]
    if not gated:
        return torch.cat(shards, dim=dim)
    halves = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)


def _full(param: torch.Tensor, group, gated: bool) -> torch.Tensor:
    """The whole (TP-gathered) megatron tensor of ``param``."""
    if group is None or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    return _cat_shards(_all_gather(param, group), int(param.partition_dim), gated)


class _Exporter:
    def __init__(self, model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype]) -> None:
        self.model, self.dtype = model, dtype
        self.cfg = dataclasses.replace(cfg, vocab_size=vocab_size)  # the layouts slice the padded rows to it
        self.map = WeightMap(model, self.cfg, *family_for(cfg))
        self.g = _Groups()
        self.num_local_experts = 0
        if cfg.is_moe:
            self.num_local_experts = cfg.num_experts // (dist.get_world_size(self.g.ep) if self.g.ep else 1)

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or not t.is_floating_point() or name.endswith("e_score_correction_bias"):
            return t
        return t.to(self.dtype)

    def groups(self) -> Iterator[list[Named]]:
        """HF tensors, one list per megatron tensor (the unit a bucket never splits)."""
        named = list(self.model.named_parameters())
        named += [(n, b) for n, b in self.model.named_buffers() if n.endswith("mlp.router.expert_bias")]
        for name, p in named:
            if name == "output_layer.weight" and self.cfg.tie_embeddings:
                continue  # tied: the last stage's copy of the embedding
            for group in self._convert(name, p):
                yield [(n, self._cast(n, t)) for n, t in group]

    def _convert(self, name: str, p: torch.Tensor) -> Iterator[list[Named]]:
        t = self.map.target(name)
        if t.expert is None:
            yield t.layout.to_hf(t.pre, _full(p, self.g.tp, t.layout.gated), self.cfg)
            return
        w = _full(p, self.g.etp, t.layout.gated)
        if self.g.ep is None:
            yield t.layout.to_hf(self.map.family.expert_prefix(t.layer, t.expert), w, self.cfg)
            return
        # expert slot `local` of every EP rank r is global expert r * num_local + local
        for r, part in enumerate(_all_gather(w, self.g.ep)):
            e = r * self.num_local_experts + t.expert
            yield t.layout.to_hf(self.map.family.expert_prefix(t.layer, e), part, self.cfg)


def _pair_mla_down_projections(groups: Iterator[list[Named]]) -> Iterator[list[Named]]:
    """Hold each ``q_a_proj`` back until its layer's ``kv_a_proj_with_mqa`` and emit them as one group.

    SGLang fuses the two into ``fused_qkv_a_proj_with_mqa`` and caches the halves only within one
    ``load_weights`` call (deepseek_weight_loader.py): split across two buckets, the weight would
    silently never load.
    """
    held: dict[str, list[Named]] = {}
    for group in groups:
        names = [n for n, _ in group]
        q_a = [n for n in names if n.endswith("self_attn.q_a_proj.weight")]
        if q_a and len(group) == 1:
            held[q_a[0].replace("q_a_proj", "kv_a_proj_with_mqa")] = group
            continue
        for n in names:
            if n in held:
                group = held.pop(n) + group
        yield group
    if held:
        raise ValueError(f"HF export: q_a_proj without its kv_a_proj_with_mqa: {sorted(held)}")


def iter_hf_groups(model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype] = None):
    """The export as lists of (HF name, tensor) that must travel in one ``load_weights`` call."""
    return _pair_mla_down_projections(_Exporter(model, cfg, vocab_size, dtype).groups())


def export_hf(model, cfg: ModelConfig, vocab_size: int, dtype: Optional[torch.dtype] = None) -> Iterator[Named]:
    """Stream this rank's model as (Hugging Face name, tensor), whole tensors (TP / EP gathered).

    Collective when torch.distributed runs with TP or EP > 1: every rank must drain the iterator.
    ``vocab_size`` is the real vocab (the padded rows are dropped); ``dtype`` casts the floating tensors
    (except the float32 ``e_score_correction_bias``); None keeps the parameters' dtype.
    """
    for group in iter_hf_groups(model, cfg, vocab_size, dtype):
        yield from group


def iter_hf_buckets(
    model, cfg: ModelConfig, vocab_size: int, bucket_bytes: int = 512 << 20, dtype: Optional[torch.dtype] = None
) -> Iterator[list[Named]]:
    """:func:`export_hf` in buckets of about ``bucket_bytes`` (a bucket exceeds it only by one group)."""
    bucket: list[Named] = []
    size = 0
    for group in iter_hf_groups(model, cfg, vocab_size, dtype):
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += group
        size += nbytes
    if bucket:
        yield bucket
