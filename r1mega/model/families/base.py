"""The family protocol and the weight layouts every family is built from.

A :class:`Family` knows, for its Hugging Face architectures, (1) the ``config.json`` <-> ModelConfig mapping and
(2) the weight map: for each megatron parameter name (relative to ``decoder.layers.N.``), a :class:`Layout` that
says which HF tensor(s) it is made of and how. Every layout works in both directions:

- ``to_hf(pre, full, m)``: the whole (TP-gathered) megatron tensor -> HF (name, tensor) pairs (the export);
- ``read(src, pre, m, shard)``: the rank's local shard of the megatron tensor, read from a :class:`Source` that
  hands out slices of HF tensors (the load; each rank reads only the rows it owns).

So a layout fact (e.g. QKV interleaved per query group) is written once and serves the export, the import and
the round trip test. torchtitan's per-model ``state_dict_adapter`` is the model followed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from r1mega.config import ModelConfig

Named = tuple[str, torch.Tensor]


# ============================================================================================ load side


class Source(Protocol):
    """Where a loader reads HF tensors from (memory-mapped safetensors in :mod:`r1mega.model.hf_load`)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor ``name``, or only its ``[start, stop)`` range along ``dim``."""
        ...

    def check(self, name: str, want: tuple[int, ...]) -> None:
        """Raise naming the file and the tensor when its shape is not ``want``."""
        ...


@dataclass(frozen=True)
class Shard:
    """Which part of a megatron tensor this rank holds: chunk ``rank`` of ``size`` along ``dim`` (None: whole)."""

    dim: Optional[int] = None
    rank: int = 0
    size: int = 1

    def range(self, n: int) -> tuple[int, int]:
        if n % self.size:
            raise ValueError(f"a dimension of {n} does not split over {self.size} ranks")
        c = n // self.size
        return self.rank * c, (self.rank + 1) * c


def _full_shape(local: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    out = list(local)
    if shard.dim is not None:
        out[shard.dim] *= shard.size
    return tuple(out)


# ============================================================================================ layouts


class Layout:
    """One megatron tensor <-> its HF tensor(s)."""

    gated = False  # a TP shard is [gate_r; up_r] (the export gathers the halves apart)

    def hf_names(self, pre: str) -> list[str]:
        raise NotImplementedError

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        raise NotImplementedError

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Rename(Layout):
    """The same tensor under another name (TP shards are plain chunks of it)."""

    hf: str

    def hf_names(self, pre: str) -> list[str]:
        return [pre + self.hf]

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        return [(pre + self.hf, full)]

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        name = pre + self.hf
        src.check(name, _full_shape(local, shard))
        if shard.dim is None or shard.size == 1:
            return src.read(name)
        return src.read(name, shard.dim, *shard.range(src.shape(name)[shard.dim]))


@dataclass(frozen=True)
class VocabRows(Layout):
    """Embedding / output layer: HF has the real vocab rows, megatron pads them (and splits them over TP)."""

    hf: str

    def hf_names(self, pre: str) -> list[str]:
        return [pre + self.hf]

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        return [(pre + self.hf, full[: m.vocab_size])]

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        name = pre + self.hf
        padded = _full_shape(local, shard)[0]
        src.check(name, (m.vocab_size or src.shape(name)[0], local[1]))
        start, stop = shard.range(padded) if shard.dim == 0 else (0, padded)
        hi = min(stop, src.shape(name)[0])
        if hi - start == local[0]:
            return src.read(name, 0, start, hi)
        rows = src.read(name, 0, start, hi) if hi > start else None
        out = torch.zeros(local, dtype=torch.float32 if rows is None else rows.dtype)
        if rows is not None:
            out[: hi - start] = rows
        return out


def _heads(m: ModelConfig) -> tuple[int, int, int]:
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.kv_channels or m.hidden_size // heads


@dataclass(frozen=True)
class QKV(Layout):
    """megatron's fused ``linear_qkv``: rows ``[q heads of group g, k_g, v_g]`` for each query group g.

    HF's q_proj head ``g * heads_per_group + j`` is megatron's head j of group g. TP splits whole groups, so a
    rank's shard is contiguous row ranges of q_proj, k_proj and v_proj. Works for the weight and the bias.
    """

    q: str
    k: str
    v: str

    def hf_names(self, pre: str) -> list[str]:
        return [pre + self.q, pre + self.k, pre + self.v]

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        heads, groups, d = _heads(m)
        per = heads // groups
        w = full.reshape(groups, per + 2, d, *full.shape[1:])
        q = w[:, :per].reshape(heads * d, *full.shape[1:])
        k = w[:, per].reshape(groups * d, *full.shape[1:])
        v = w[:, per + 1].reshape(groups * d, *full.shape[1:])
        return [(pre + self.q, q), (pre + self.k, k), (pre + self.v, v)]

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        heads, groups, d = _heads(m)
        per, rest = heads // groups, tuple(local[1:])
        for name, rows in ((self.q, heads * d), (self.k, groups * d), (self.v, groups * d)):
            src.check(pre + name, (rows, *rest))
        g0, g1 = Shard(0, shard.rank, shard.size).range(groups) if shard.dim == 0 else (0, groups)
        n = g1 - g0
        q = src.read(pre + self.q, 0, g0 * per * d, g1 * per * d).reshape(n, per * d, *rest)
        k = src.read(pre + self.k, 0, g0 * d, g1 * d).reshape(n, d, *rest)
        v = src.read(pre + self.v, 0, g0 * d, g1 * d).reshape(n, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(local)


@dataclass(frozen=True)
class GateUp(Layout):
    """SwiGLU ``linear_fc1`` = ``[gate; up]``; a TP shard is ``[gate_r; up_r]``."""

    gate: str
    up: str
    gated = True

    def hf_names(self, pre: str) -> list[str]:
        return [pre + self.gate, pre + self.up]

    def to_hf(self, pre: str, full: torch.Tensor, m: ModelConfig) -> list[Named]:
        gate, up = full.chunk(2, dim=0)
        return [(pre + self.gate, gate), (pre + self.up, up)]

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        full = _full_shape(local, shard)
        want = (full[0] // 2, *full[1:])
        parts = []
        for name in (self.gate, self.up):
            src.check(pre + name, want)
            if shard.dim == 0 and shard.size > 1:
                parts.append(src.read(pre + name, 0, *shard.range(want[0])))
            elif shard.dim is not None and shard.size > 1:
                parts.append(src.read(pre + name, shard.dim, *shard.range(want[shard.dim])))
            else:
                parts.append(src.read(pre + name))
        return torch.cat(parts, dim=0)


# ============================================================================================ config helpers


def require(hf: dict[str, Any], key: str, arch: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{arch} config.json has no {key!r}, which the architecture needs")
    return hf[key]


def rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None). Reads both ``rope_theta`` + ``rope_scaling`` and the
    transformers-5 ``rope_parameters`` (which carries the theta and the scaling in one dict)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params or None
    theta = hf.get("rope_theta")
    if theta is None:
        theta = (scaling or {}).get("rope_theta", 10000.0)
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


# ============================================================================================ the protocol


class Family:
    """One HF model family. Subclasses set the class attributes and override the hooks they need."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    model_types: dict[str, str] = {}
    rope_scaling_ok = False  # only MLA models map a rope scaling (YaRN) onto ModelConfig

    # ---------------------------------------------------------------- config.json -> ModelConfig
    def config_from_hf(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        """ModelConfig keyword arguments of this architecture's ``config.json``."""
        return self.common_from_hf(hf, arch)

    def common_from_hf(self, hf: dict[str, Any], arch: str) -> dict[str, Any]:
        """Fields every supported architecture shares: a pre-norm RMSNorm decoder with a SwiGLU MLP."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported: the MLP is SwiGLU (hidden_act 'silu') only")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"{key}=true is not supported: r1mega builds its linear layers without biases")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported: attention is full causal attention")
        theta, scaling = rope(hf)
        if scaling is not None and not self.rope_scaling_ok:
            kind = scaling.get("rope_type") or scaling.get("type")
            raise ValueError(
                f"rope_scaling of type {kind!r} is not supported for {arch}: ModelConfig has no field for it "
                "(only the YaRN scaling of MLA models is)"
            )
        return dict(
            num_layers=require(hf, "num_hidden_layers", arch),
            hidden_size=require(hf, "hidden_size", arch),
            num_attention_heads=require(hf, "num_attention_heads", arch),
            # the dense FFN width; for MoE models only the first_k_dense_layers use it
            ffn_hidden_size=require(hf, "intermediate_size", arch),
            vocab_size=require(hf, "vocab_size", arch),
            max_position_embeddings=require(hf, "max_position_embeddings", arch),
            rotary_base=float(theta),
            norm_epsilon=float(require(hf, "rms_norm_eps", arch)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
        )

    # ---------------------------------------------------------------- ModelConfig -> config.json
    def architecture_for(self, m: ModelConfig) -> Optional[str]:
        """The architecture of this family that computes exactly ``m``; None if ``m`` is not this family's.

        May raise ValueError naming the field when ``m`` is this family's kind of model but does not match it.
        """
        raise NotImplementedError

    def hf_config(self, m: ModelConfig, arch: str) -> dict[str, Any]:
        """The family-specific ``config.json`` keys (the common ones are written by the caller)."""
        return {}

    # ---------------------------------------------------------------- weights
    def layer_layouts(self, m: ModelConfig, arch: str) -> dict[str, Layout]:
        """megatron name under ``decoder.layers.N.`` -> layout, HF names under ``model.layers.N.``.

        Both the local spec's names and the Transformer Engine spec's (norms fused into the next linear).
        """
        out: dict[str, Layout] = {
            "input_layernorm.weight": Rename("input_layernorm.weight"),
            "pre_mlp_layernorm.weight": Rename("post_attention_layernorm.weight"),
            "mlp.linear_fc1.layer_norm_weight": Rename("post_attention_layernorm.weight"),  # TE
            "self_attention.linear_proj.weight": Rename("self_attn.o_proj.weight"),
            "mlp.linear_fc1.weight": GateUp("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "mlp.linear_fc2.weight": Rename("mlp.down_proj.weight"),
        }
        if m.is_moe:
            out["mlp.router.weight"] = Rename("mlp.gate.weight")
        return out

    def expert_layouts(self) -> dict[str, Layout]:
        """Routed expert ``linear_fc1`` / ``linear_fc2`` -> per-expert HF tensors under ``mlp.experts.{e}.``."""
        return {
            "linear_fc1": GateUp("gate_proj.weight", "up_proj.weight"),
            "linear_fc2": Rename("down_proj.weight"),
        }

    def expert_prefix(self, layer: int, e: int) -> str:
        return f"model.layers.{layer}.mlp.experts.{e}."

    def top_layouts(self, m: ModelConfig) -> dict[str, Layout]:
        """The embedding, the final norm and the output layer (the tied output layer is the embedding)."""
        return {
            "embedding.word_embeddings.weight": VocabRows("model.embed_tokens.weight"),
            "decoder.final_layernorm.weight": Rename("model.norm.weight"),
            "output_layer.weight": VocabRows("model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight"),
        }

    def ignored_hf(self, name: str, m: ModelConfig) -> bool:
        """HF tensors the megatron model has no place for, on purpose (rotary caches, a tied lm_head)."""
        return name.endswith("rotary_emb.inv_freq") or (m.tie_embeddings and name == "lm_head.weight")


# ============================================================================================ GQA families


def gqa_from_hf(hf: dict[str, Any], qk_norm: bool) -> dict[str, Any]:
    """Standard rotary attention with grouped KV heads (Llama, Qwen2, Qwen3, Qwen3-MoE)."""
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(
        # None = megatron's default (MHA / hidden // heads), so MHA models compare equal either way
        num_query_groups=kv_heads if kv_heads != heads else None,
        # Qwen3 decouples the head dim from hidden / heads (Qwen3-30B-A3B: 128, not 2048 / 32 = 64)
        kv_channels=head_dim if head_dim != hf["hidden_size"] // heads else None,
        # Qwen3's q_norm / k_norm are RMSNorms over each head's dim, which is megatron's qk_layernorm
        qk_layernorm=qk_norm,
        position_embedding_type="rope",
    )


def gqa_hf_config(m: ModelConfig) -> dict[str, Any]:
    heads = m.num_attention_heads
    return dict(num_key_value_heads=m.num_query_groups or heads, head_dim=m.kv_channels or m.hidden_size // heads)


def gqa_layouts(m: ModelConfig) -> dict[str, Layout]:
    out: dict[str, Layout] = {
        "self_attention.linear_qkv.weight": QKV(
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
        ),
        "self_attention.linear_qkv.layer_norm_weight": Rename("input_layernorm.weight"),  # TE: fused into QKV
    }
    if m.add_qkv_bias:
        out["self_attention.linear_qkv.bias"] = QKV(
            "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"
        )
    if m.qk_layernorm:
        out["self_attention.q_layernorm.weight"] = Rename("self_attn.q_norm.weight")
        out["self_attention.k_layernorm.weight"] = Rename("self_attn.k_norm.weight")
    return out


def dense_gqa(m: ModelConfig, qk_norm: bool, qkv_bias: bool) -> bool:
    """``m`` is a dense rotary GQA model with (or without) q/k norms and QKV biases."""
    return (
        not m.is_moe
        and not m.multi_latent_attention
        and m.position_embedding_type == "rope"
        and m.qk_layernorm == qk_norm
        and m.add_qkv_bias == qkv_bias
    )
