"""Upcycling: a dense HF checkpoint -> a DeepSeek-V3-style MoE that computes exactly the dense function at step 0.

The only real pretrained model we can ship is dense (SmolLM2); upcycling lets the MoE code paths (EP, grouped
GEMM, the sigmoid router with its aux-loss-free expert bias, routing replay) run on real weights.

``model.upcycle_experts=N`` (top-k = ``model.moe_router_topk``) builds every layer's MLP as one of:

- ``model.upcycle_shared_expert=true`` (default): the shared expert IS the dense SwiGLU MLP, and every routed
  expert is a copy of it whose down projection starts at zero. The routed branch adds exactly 0 at step 0, so
  the model computes the dense function bit for bit (same GEMM shapes as the dense MLP, + 0.0); the first
  optimizer step moves the down projections (their gradient is the routed activations), the next ones the
  gate/up copies and the router. This is the zero-initialised-residual form of upcycling.
- ``model.upcycle_shared_expert=false``: every routed expert is a full copy of the dense MLP and no shared
  expert; megatron renormalises the selected sigmoid scores to sum to 1 (top-k >= 2), so
  ``sum_k w_k expert(x) = dense(x)`` up to float rounding (~1e-4 on SmolLM2's 30 layers: w_1 + w_2 is 1 only
  to an ulp).

Either way the router keeps its random initialisation (std ``init_method_std``, so tokens spread over the
experts) and the expert bias starts at 0 (aux-loss-free balancing moves it from the first step). The export
refuses the result (no HF architecture has GQA attention with a sigmoid-routed MoE and shared experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from r1mega.config import ConfigError, ModelConfig
from r1mega.model.families.base import Layout, Shard, Source


def upcycle_config(m: ModelConfig, experts: int, shared: bool, topk: int) -> ModelConfig:
    """The MoE ModelConfig of dense ``m`` (see the module docstring)."""
    if m.is_moe:
        raise ConfigError(f"model.upcycle_experts={experts}: {m.hf_path} is already an MoE model")
    if topk > experts or (topk < 2 and not shared):
        raise ConfigError(
            f"model.upcycle_experts={experts} needs 2 <= model.moe_router_topk <= {experts} (got {topk}) without "
            "a shared expert: the copies sum to the dense MLP only when the top-k sigmoid scores are renormalised"
        )
    return dataclasses.replace(
        m,
        name=f"{m.name}-upcycled{experts}",
        num_experts=experts,
        moe_ffn_hidden_size=m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.ffn_hidden_size if shared else None,
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=None,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_dtype="fp32",
        first_k_dense_layers=0,
    )


@dataclass(frozen=True)
class Window(Layout):
    """Hidden units ``[start, stop)`` of the dense MLP: rows of gate/up (dim 0) or columns of down (dim 1);
    ``zero``: a tensor of that shape filled with zeros (the routed down projections of the shared-expert form)."""

    names: tuple[str, ...]
    dim: int
    start: int
    stop: int
    zero: bool = False

    def hf_names(self, pre: str) -> list[str]:
        return [pre + n for n in self.names]

    def read(self, src: Source, pre: str, m: ModelConfig, shard: Shard, local: tuple[int, ...]) -> torch.Tensor:
        full = (m.ffn_hidden_size, m.hidden_size) if self.dim == 0 else (m.hidden_size, m.ffn_hidden_size)
        a, b = self.start, self.stop
        if shard.size > 1:
            if shard.dim != self.dim:
                raise ValueError(f"upcycling: a shard along dim {shard.dim} of {self.names} is not supported")
            s, e = shard.range(b - a)
            a, b = a + s, a + e
        parts = []
        for n in self.names:
            src.check(pre + n, full)
            parts.append(torch.zeros(local) if self.zero else src.read(pre + n, self.dim, a, b))
        return torch.cat(parts, dim=0)


class Upcycle:
    """The load plan of the MoE parts of an upcycled model (everything else loads as the dense family's)."""

    def __init__(self, m: ModelConfig) -> None:
        f, shared = m.ffn_hidden_size, bool(m.moe_shared_expert_intermediate_size)
        gate_up, down = ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp.down_proj.weight",)
        self.routed = {"linear_fc1": Window(gate_up, 0, 0, f), "linear_fc2": Window(down, 1, 0, f, zero=shared)}
        self.shared = {"linear_fc1": Window(gate_up, 0, 0, f), "linear_fc2": Window(down, 1, 0, f)}

    @staticmethod
    def owns(name: str) -> bool:
        return any(k in name for k in (".mlp.router.", ".mlp.experts.", ".mlp.shared_experts."))

    def layout(self, name: str) -> Layout | None:
        """None: keep the initialisation (the router weight and the expert bias)."""
        if ".mlp.router." in name:
            return None
        which = "linear_fc1" if ".linear_fc1." in name else "linear_fc2"
        return (self.shared if ".mlp.shared_experts." in name else self.routed)[which]
