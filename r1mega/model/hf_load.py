"""Hugging Face folder -> megatron-core GPTModel, at any TP / PP / EP layout (``model.hf_path``).

Two functions the trainer calls:

- :func:`resolve_model_config`: ``config.json`` -> the ModelConfig (through the model families), keeping the
  training knobs of the user's config; ``model.tokenizer`` defaults to the folder; ``model.upcycle_experts``
  turns a dense model into an MoE (:mod:`r1mega.model.upcycle`).
- :func:`load_hf_weights`: each rank reads only the tensors, and of those only the rows / columns, that its
  parameters hold: safetensors files (one, or sharded with ``model.safetensors.index.json``) are memory-mapped
  and sliced (``safe_open(..).get_slice``), one megatron tensor at a time, the file closed after each, so the
  host memory of loading is bounded by the rank's own shard (the model it built) plus one HF tensor. The peak
  RSS of the load is measured (``/proc/self/status`` VmHWM, reset before loading) and printed per rank.

Every HF tensor must find a place: a missing, unexpected (checked over all ranks) or wrongly shaped tensor
raises ValueError naming the file and the tensor. Deliberately skipped: rotary caches (``inv_freq``), a tied
``lm_head.weight``, DeepSeek-V3's MTP layers (see the families).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.config import ConfigError, ModelConfig
from r1mega.model.families import architecture_of, family_of
from r1mega.model.families.base import Shard
from r1mega.model.families.weight_map import WeightMap
from r1mega.model.hf_config import model_config_from_hf

# training choices, not architecture: the user's config keeps them over config.json's
_TRAINING_KNOBS = (
    "make_vocab_size_divisible_by",
    "moe_router_bias_update_rate",
    "moe_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_token_dispatcher_type",
    "moe_grouped_gemm",
    "checkpoint",
    "upcycle_experts",
    "upcycle_shared_expert",
)


def read_hf_config(path: str | os.PathLike) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.hf_path={str(path)!r} has no config.json ({file}); point it at a HF model folder")
    return json.loads(file.read_text())


def resolve_model_config(m: ModelConfig) -> ModelConfig:
    """The ModelConfig to build: ``m`` itself, or the architecture of ``m.hf_path``'s config.json.

    The architecture fields come from config.json (a clear error for an unsupported architecture or field);
    the training knobs (load balancing, dispatcher, grouped GEMM, vocab padding) and the name stay the user's;
    ``tokenizer`` defaults to the folder (its tokenizer and chat template).
    """
    if not m.hf_path:
        if m.upcycle_experts:
            raise ConfigError("model.upcycle_experts needs model.hf_path=<a dense HF model folder>")
        return m
    hf = read_hf_config(m.hf_path)
    name = m.name if m.name != ModelConfig.name else Path(m.hf_path).name
    arch = model_config_from_hf(hf, name)
    out = dataclasses.replace(
        arch,
        **{k: getattr(m, k) for k in _TRAINING_KNOBS},
        hf_path=str(m.hf_path),
        tokenizer=str(m.hf_path) if m.tokenizer == ModelConfig.tokenizer else m.tokenizer,
    )
    if m.upcycle_experts:
        from r1mega.model.upcycle import upcycle_config

        out = upcycle_config(out, m.upcycle_experts, m.upcycle_shared_expert, m.moe_router_topk)
    return out


# ============================================================================================ reading


class SafetensorsSource:
    """Slices of the tensors of a HF folder, memory-mapped; records which tensors were read."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.root = Path(path)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            self.where = index.name
            self.file_of = {n: self.root / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.root}: no *.safetensors files (and no model.safetensors.index.json)")
            self.where = ", ".join(f.name for f in files)
            self.file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    self.file_of.update({n: f for n in h.keys()})
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.used: set[str] = set()

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise ValueError(f"{self.root}: tensor {name!r} is missing (looked in {self.where})")
        return self.file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(self._file(name), framework="pt") as h:
                self._shapes[name] = tuple(h.get_slice(name).get_shape())
        return self._shapes[name]

    def check(self, name: str, want: tuple[int, ...]) -> None:
        got = self.shape(name)
        if tuple(got) != tuple(want):
            raise ValueError(
                f"{self._file(name)}: tensor {name!r} has shape {list(got)}, the model built from config.json "
                f"expects {list(want)}"
            )

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        from safetensors import safe_open

        self.used.add(name)
        # one open per read: the mapping (and the file pages it keeps resident) ends with the block
        with safe_open(self._file(name), framework="pt") as h:
            if dim is None:
                return h.get_tensor(name)
            sl = h.get_slice(name)
            stop = sl.get_shape()[dim] if stop is None else stop
            return sl[(slice(None),) * dim + (slice(start, stop),)]


# ============================================================================================ loading


@dataclasses.dataclass
class LoadReport:
    """What one rank loaded, and what it cost in host memory (bytes)."""

    tensors: int
    shard_bytes: int  # this rank's parameters (the model it built)
    largest_hf_bytes: int  # the largest HF tensor this rank read
    rss_before: int
    rss_peak: int  # peak resident set during the load
    seconds: float

    @property
    def extra_peak(self) -> int:
        return self.rss_peak - self.rss_before


def _rss() -> tuple[int, int]:
    """(current, peak) resident set in bytes, from /proc/self/status (ru_maxrss where it is missing)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        return peak, peak


def _reset_peak_rss() -> None:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _groups():
    """(tp rank, tp size, expert-tp rank, expert-tp size, ep rank) of this process."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, 0, 1, 0
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_rank(),
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_expert_model_parallel_rank(),
    )


def _tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if n.endswith("mlp.router.expert_bias"))


@torch.no_grad()
def load_hf_weights(model, m: ModelConfig, hf_path: Optional[str] = None, verbose: bool = True) -> LoadReport:
    """Fill this rank's ``model`` (built from ``m`` = :func:`resolve_model_config`'s result) from ``hf_path``.

    Collective over the world (the check that no HF tensor was left over): every rank must call it.
    After it, a training caller must refresh optimizer copies (``optimizer.reload_model_params()``) and
    the reference model.
    """
    path = hf_path or m.hf_path
    if not path:
        raise ValueError("load_hf_weights needs hf_path (or model.hf_path)")
    t0 = time.perf_counter()
    hf = read_hf_config(path)
    arch = architecture_of(hf)
    family = family_of(arch)
    src = SafetensorsSource(path)
    upcycle = None
    if m.upcycle_experts:
        from r1mega.model.upcycle import Upcycle

        upcycle = Upcycle(m)
    wmap = WeightMap(model, m, family, arch)
    tp, tp_size, etp, etp_size, ep = _groups()
    n_local = _local_experts(model) if m.is_moe else 0
    _reset_peak_rss()
    rss_before, _ = _rss()
    count, largest, shard_bytes = 0, 0, 0
    for name, p in _tensors(model):
        shard_bytes += p.numel() * p.element_size()
        if upcycle is not None and upcycle.owns(name):
            layout, pre, expert = upcycle.layout(name), f"model.layers.{wmap.layer(name)}.", ".mlp.experts." in name
            if layout is None:
                continue  # the router: keeps its initialisation (see r1mega.model.upcycle)
        else:
            t = wmap.target(name)
            layout, pre, expert = t.layout, t.pre, t.expert is not None
            if expert:
                pre = family.expert_prefix(t.layer, ep * n_local + t.expert)
        shard = Shard()
        if getattr(p, "tensor_model_parallel", False):
            shard = Shard(int(p.partition_dim), etp, etp_size) if expert else Shard(int(p.partition_dim), tp, tp_size)
        try:
            value = layout.read(src, pre, m, shard, tuple(p.shape))
        except ValueError as e:
            raise ValueError(f"{e} (loading megatron parameter {name!r} from {path})") from None
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{path}: {layout.hf_names(pre)} give shape {list(value.shape)} for {name!r}, "
                             f"which has {list(p.shape)}")  # fmt: skip
        largest = max(largest, value.numel() * value.element_size())
        p.copy_(value)
        del value
        count += 1
    _check_all_used(src, family, m, path)
    _, peak = _rss()
    report = LoadReport(count, shard_bytes, largest, rss_before, peak, time.perf_counter() - t0)
    if verbose:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(
            f"[rank {rank}] loaded {count} tensors from {path} in {report.seconds:.1f} s: peak RSS during the load "
            f"{peak / 2**20:.0f} MiB = {rss_before / 2**20:.0f} MiB before (incl. this rank's shard "
            f"{shard_bytes / 2**20:.0f} MiB) + {report.extra_peak / 2**20:.1f} MiB (largest HF tensor read "
            f"{largest / 2**20:.1f} MiB)",
            flush=True,
        )
    return report


def _local_experts(model) -> int:
    for mod in model.modules():
        if hasattr(mod, "num_local_experts"):
            return int(mod.num_local_experts)
    return 1


def _check_all_used(src: SafetensorsSource, family, m: ModelConfig, path) -> None:
    used = src.used
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(used))
        used = {n for names in everyone for n in names}
    extra = sorted(n for n in src.file_of if n not in used and not family.ignored_hf(n, m))
    if extra:
        shown = ", ".join(f"{n!r} ({src.file_of[n].name})" for n in extra[:8])
        raise ValueError(
            f"{path}: {len(extra)} tensor(s) have no place in the megatron model built from config.json: {shown}"
            + (" ..." if len(extra) > 8 else "")
        )
