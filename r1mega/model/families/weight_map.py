"""megatron parameter names -> the family's layouts (shared by the HF export and the HF load)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from r1mega.config import ModelConfig
from r1mega.model.families.base import Family, Layout

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


@dataclass(frozen=True)
class Target:
    """Where one megatron tensor goes: its layout, the HF name prefix, and for a routed expert its slot."""

    layout: Layout
    pre: str
    layer: Optional[int] = None  # global layer number (from 0)
    expert: Optional[int] = None  # local expert slot on this EP rank (None: not a routed expert)


class WeightMap:
    """Resolves this rank's megatron names (any TP / PP / EP layout; local or TE spec) to their targets."""

    def __init__(self, model, m: ModelConfig, family: Family, arch: str) -> None:
        self.m, self.family = m, family
        self.layers = family.layer_layouts(m, arch)
        self.top = family.top_layouts(m)
        self.experts = family.expert_layouts()
        # local layer index -> global layer index (pipeline stages number their layers from 0)
        decoder = getattr(model, "decoder", None)
        self.layer_of = {i: int(layer.layer_number) - 1 for i, layer in enumerate(getattr(decoder, "layers", []))}

    def layer(self, name: str) -> int:
        """The global layer number (from 0) of a ``decoder.layers.N.`` parameter."""
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a decoder layer parameter")
        return self.layer_of[int(m.group(1))]

    def target(self, name: str) -> Target:
        if name in self.top:
            return Target(self.top[name], "")
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"unexpected megatron parameter {name!r}")
        layer, rest = self.layer_of[int(m.group(1))], m.group(2)
        if rest.startswith("mlp.experts."):
            e = _LOCAL_EXPERT.match(rest)
            if e is not None:
                local, which = int(e.group(1)), e.group(2)
            else:
                e = _TE_EXPERT.match(rest)
                if e is None:
                    raise ValueError(
                        f"unexpected expert parameter {rest!r} (legacy GroupedMLP weight1/weight2 is not supported; "
                        "megatron's TE spec builds TEGroupedMLP)"
                    )
                which, local = e.group(1), int(e.group(2))
            return Target(self.experts[which], "", layer, local)
        if rest not in self.layers:
            raise ValueError(f"unexpected megatron layer parameter {rest!r} for {self.family.name}")
        return Target(self.layers[rest], f"model.layers.{layer}.", layer)
