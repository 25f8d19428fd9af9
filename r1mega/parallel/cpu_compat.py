"""Everything megatron-core 0.16.1 needs to run on a CPU-only torch build, in one place.

megatron-core is written for CUDA; on the CPU (tests, CI, the embedded default job) a handful of
hard-coded CUDA assumptions break it. :func:`install` fixes them for the whole process and is called
once by :mod:`r1mega.parallel.runtime` when no GPU is present; no other module knows about the CPU.
Each piece below says which megatron line it exists for. Facts: ../shared/notes/mcore_cpu.md.
"""

from __future__ import annotations

import os
import time

import torch
from torch.overrides import TorchFunctionMode

_installed = False


class _CpuEvent(torch.cpu.Event):
    """torch.cuda.Event stand-in: megatron's inference controller builds Events with
    ``enable_timing=True`` (torch.cpu.Event takes no arguments) and calls ``elapsed_time``."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_):
        self._t = 0.0

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._t - self._t) * 1e3


class _CpuStream(torch.cpu.Stream):
    """torch.cuda.Stream stand-in: the alltoall token dispatcher creates a side stream in its
    constructor and calls ``record_event().synchronize()`` (torch.cpu.Stream returns None there)."""

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _is_cuda_device(d) -> bool:
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class CudaToCpu(TorchFunctionMode):
    """Rewrites literal CUDA placements to the CPU.

    megatron's schedules (``total_num_tokens``), optimizer (``FP32Optimizer._scale``, clip_grads),
    default causal mask and inference controller create tensors with ``device='cuda'``, call
    ``.cuda()``, pin memory, or assert ``grad.type() == 'torch.cuda.FloatTensor'``. Entered once for
    the whole process: its cost is not measurable next to the model's own ops.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = func(*args)
            return t if t.startswith("torch.cuda.") else t.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}  # no pinned-memory allocator without an accelerator
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    # Module constructors call torch.cuda.current_device() (router expert-bias buffers),
    # torch.cuda.Stream() (alltoall dispatcher) and Events (inference); torch.cpu has stand-ins.
    # Wrap rather than alias torch.cpu functions: dynamo keys handlers by function identity.
    c = torch.cuda
    c.current_device = lambda: "cpu"
    c.Stream, c.Event = _CpuStream, _CpuEvent
    c.current_stream = lambda device=None: torch.cpu.current_stream()
    c.stream = lambda stream=None: torch.cpu.stream(stream)
    c.synchronize = lambda device=None: None
    c.empty_cache = lambda: None


def _patch_megatron() -> None:
    # (The two TE-absence bugs, MLA's mocked TELinear and the router's te_general_gemm, are not CPU
    # issues: r1mega.model.builder fixes them for every build without Transformer Engine.)
    from megatron.core.inference import communication_utils
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The alltoall dispatcher converts EP split sizes with maybe_move_tensor_to_cpu(as_numpy=True),
    # which only converts CUDA tensors: CPU tensors reach all_to_all_single(output_split_sizes=...).
    orig = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    # Activation recompute snapshots the CUDA RNG state; the CPU RNG (which drives CPU dropout) is
    # saved and restored separately by megatron, so an empty CUDA state is exact.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    # Static inference with PP > 1 asserts tensor.is_cuda before pipeline broadcasts.
    def _is_cuda(tensor):
        assert tensor is not None

    communication_utils._is_cuda = _is_cuda


def install() -> None:
    """Make this process able to run megatron-core on the CPU. Idempotent."""
    global _installed
    if _installed:
        return
    assert not torch.cuda.is_available(), "cpu_compat is only for processes without a GPU"
    # megatron decorates small fused functions with torch.compile at import; on the CPU inductor
    # would compile C++ with gcc on first use (2-9 s per process) for no steady-state gain.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch._dynamo.config.disable = True
    _patch_torch_cuda()
    _patch_megatron()
    CudaToCpu().__enter__()  # process-wide: stays on the mode stack until exit
    _installed = True
