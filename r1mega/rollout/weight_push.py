"""The SGLang weight push: bucket planning (pure, CPU-tested), flattened per-dtype payloads, per-push statistics.

Planning (:func:`plan_buckets`): the export streams *groups* (tensors that must reach SGLang in one
``load_weights`` call: a layer's MLA ``q_a_proj`` + ``kv_a_proj_with_mqa``); consecutive groups of one layer's
routed experts are merged into one unit, so SGLang's MoE loader gets a layer's experts in one call instead of
one call per expert tensor; each bucket holds one dtype (a flattened bucket is a byte buffer that SGLang views
back per tensor: one dtype keeps every tensor aligned for its ``view(dtype)``) and about ``bucket_bytes``
(a single unit larger than that is a bucket of its own).

Payload (:func:`flattened_payloads`): sglang 0.5.17's ``FlattenedTensorBucket``
(``sglang/srt/weight_sync/tensor_bucket.py``) concatenates a bucket into one buffer plus metadata;
``Engine.update_weights_from_tensor(named_tensors=<one serialized {"flattened_tensor", "metadata"} per TP
rank>, load_format="flattened_bucket")`` (``sglang/srt/entrypoints/engine.py``, consumed by
``model_runner_components/weight_updater.py::_update_weights_from_flattened_bucket``) sends CUDA IPC handles,
not copies. The call returns once the schedulers loaded the bucket, so the caller holds the buffer until then.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Named = tuple[str, torch.Tensor]
_EXPERTS = re.compile(r"^(.*\.layers\.\d+\.mlp\.experts)\.\d+\.")


def _nbytes(group: list[Named]) -> int:
    return sum(t.numel() * t.element_size() for _, t in group)


def _experts_of(group: list[Named]) -> str | None:
    """The ``...layers.N.mlp.experts`` prefix when every tensor of the group is a routed expert of that layer."""
    keys = {m.group(1) if (m := _EXPERTS.match(n)) else None for n, _ in group}
    return keys.pop() if len(keys) == 1 else None


def merge_expert_groups(groups: Iterable[list[Named]]) -> Iterator[list[Named]]:
    """Consecutive groups of one layer's routed experts -> one group (one SGLang ``load_weights`` call)."""
    held: list[Named] = []
    held_key = None
    for g in groups:
        key = _experts_of(g)
        if held and key != held_key:
            yield held
            held = []
        if key is None:
            yield g
        else:
            held, held_key = held + g, key
    if held:
        yield held


def plan_buckets(groups: Iterable[list[Named]], bucket_bytes: int) -> Iterator[list[Named]]:
    """Stream groups into single-dtype buckets of about ``bucket_bytes``; groups (and a layer's experts) stay whole."""
    open_: dict[torch.dtype, tuple[list[Named], int]] = {}
    for g in merge_expert_groups(groups):
        dtypes = {t.dtype for _, t in g}
        if len(dtypes) != 1:  # a group that must travel together but mixes dtypes: its own bucket
            yield g
            continue
        dtype, size = dtypes.pop(), _nbytes(g)
        bucket, used = open_.pop(dtype, ([], 0))
        if bucket and used + size > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        open_[dtype] = (bucket + g, used + size)
    for bucket, _ in open_.values():
        yield bucket


def flattened_payloads(bucket: list[Named], tp_size: int) -> tuple[list[Any], torch.Tensor]:
    """(one serialized FlattenedTensorBucket per SGLang TP rank, the flat buffer the caller keeps alive)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    fb = FlattenedTensorBucket(named_tensors=bucket)
    flat = fb.get_flattened_tensor()
    if flat.is_cuda:
        torch.cuda.current_stream().synchronize()  # the consumer reads it from another process
    payload = {"flattened_tensor": flat, "metadata": fb.get_metadata()}
    return [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(tp_size)], flat


@dataclass
class PushStats:
    """One push, split by stage: gather (draw the export: TP / EP gathers + dtype cast), convert (flatten +
    serialize the IPC handles), ipc_load (SGLang's call: receive the handles and load; one client-side call, so
    the two are not separable here), verify (read back a sample)."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("gather", "convert", "ipc_load"), 0.0))
    verify: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {
            "push/bytes": float(self.bytes),
            "push/tensors": float(self.tensors),
            "push/buckets": float(self.buckets),
        }
        out["push/seconds"] = self.seconds
        out["push/gb_per_s"] = self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0
        out.update({f"push/{k}_s": v for k, v in self.times.items()})
        out["push/verify_s"] = self.verify
        return out


def timed(stats: PushStats, stage: str, it: Iterator):
    """Iterate ``it``, charging the time spent producing each item to ``stats.times[stage]``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            stats.times[stage] += time.perf_counter() - t0
            return
        stats.times[stage] += time.perf_counter() - t0
        yield item
