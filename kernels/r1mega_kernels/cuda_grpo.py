"""Host side of the one-read GRPO kernel (``grpo_cluster.cu``): compile with NVRTC, check it applies, launch.

Single-rank GRPO loss + d(logits) on Hopper (sm_90+), bf16 logits and gradient: DRAM sees one read and one write
of the logits (4TV bytes) instead of the ~6TV of the Triton two-sweep kernel, because each row is held on chip by
a cluster of CTAs (see the .cu file for why this needs CUDA). Where it does not apply (no Hopper, other dtypes,
unaligned rows, tensor parallel, NVRTC unavailable) ``ops.py`` uses the Triton kernels; :func:`unsupported_reason`
says why.

Compiled on first use per configuration through ``torch.cuda._compile_kernel`` (PyTorch's NVRTC wrapper, >= 2.8):
no nvcc, no C++ build step. It is launched here with our own ``cuLaunchKernel`` call because PyTorch's launcher
passes every Python int as a 32-bit C int (our strides and row counts need 64 bits) and floats as doubles.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("grpo_cluster.cu")
_KERNEL = "r1k_grpo_cluster"
DIAG = 0  # benchmark-only ablations compiled into the kernel (R1K_DIAG in the .cu file); 0 in real use
_DISABLED: list[str] = []  # set once if compiling / launching failed: every later call goes to Triton


def disable(reason: str) -> None:
    """Turn the kernel off for this process (after NVRTC or the driver failed once), with the reason."""
    if not _DISABLED:
        warnings.warn(f"r1mega_kernels: GRPO cluster kernel off, using Triton: {reason}", stacklevel=2)
        _DISABLED.append(reason)


@dataclass(frozen=True)
class ClusterConfig:
    """Launch shape: ``cluster`` CTAs of ``threads`` threads hold one row (a 1/cluster slice each).

    ``ctas_per_sm``: CTAs the grid assumes resident per SM (the kernel is persistent over rows; 0 = from the
    compiled kernel's shared memory / registers). ``min_blocks``: the register budget handed to the compiler
    (``__launch_bounds__``). ``stage``: write as much of each gradient slice as the shared memory left over holds
    through a staging buffer and an asynchronous bulk store (R1K_STAGE_VEC), so the writes spread over time."""

    cluster: int = 2
    threads: int = 512
    ctas_per_sm: int = 0
    min_blocks: int = 1
    stage: bool = True


@dataclass
class _Compiled:
    func: ctypes.c_void_p
    smem: int
    occupancy: int
    n_regs: int
    stage_vec: int
    max_clusters: int
    resident: int  # clusters in the persistent grid


def _chunk(vocab: int, cluster: int) -> int:
    """Columns per CTA: ceil(V / cluster) rounded up to 8 (16-byte vectors)."""
    per_cta = -(-vocab // cluster)
    return -(-per_cta // 8) * 8


def unsupported_reason(
    x: torch.Tensor, dx: torch.Tensor, strides: tuple[int, ...], vocab: int, cfg: ClusterConfig
) -> str | None:
    """None if the cluster kernel can run on these tensors, else a short reason (the caller falls back to Triton)."""
    if _DISABLED:
        return _DISABLED[0]
    if x.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.version.hip:
        return "ROCm"
    major, limit = _device_limits(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if major < 9:
        return "needs sm_90+ (thread-block clusters)"
    if x.dtype != torch.bfloat16 or dx.dtype != torch.bfloat16:
        return f"bf16 logits and gradient only (got {x.dtype}, {dx.dtype})"
    if vocab % 8 or any(s % 8 for s in strides) or x.data_ptr() % 16 or dx.data_ptr() % 16:
        return "rows must start on 16-byte boundaries (V and the row strides multiples of 8)"
    if x.numel() // max(vocab, 1) >= 2**31:
        return "more than 2^31 rows"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this PyTorch has no torch.cuda._compile_kernel (NVRTC), needs >= 2.8"
    smem = _chunk(vocab, cfg.cluster) * 2
    if smem > limit:
        return f"a 1/{cfg.cluster} row slice needs {smem} B of shared memory > {limit} B: use a larger cluster"
    return None


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(compute capability major, opt-in shared memory per block), cached: queried on every call otherwise."""
    props = torch.cuda.get_device_properties(index)
    return props.major, getattr(props, "shared_memory_per_block_optin", 0)


def stage_vectors(cfg: ClusterConfig, chunk: int, smem_per_sm: int, smem_per_block: int) -> int:
    """16-byte vectors of the staging buffer: what fits next to the slot (1 KB kept for the static arrays)."""
    budget = min(smem_per_block, smem_per_sm // cfg.min_blocks - 1024) - 1024
    return max(0, min(chunk // 8, (budget - chunk * 2) // 16)) if cfg.stage else 0


def kernel_source(cfg: ClusterConfig, chunk: int, has_ref: bool, stage_vec: int, diag: int = 0) -> str:
    """The CUDA source as NVRTC compiles it: the launch shape as #defines, then grpo_cluster.cu."""
    defines = dict(
        R1K_STAGE_VEC=stage_vec,
        R1K_CLUSTER=cfg.cluster,
        R1K_THREADS=cfg.threads,
        R1K_CHUNK=chunk,
        R1K_HAS_REF=int(has_ref),
        R1K_MIN_BLOCKS=cfg.min_blocks,
        R1K_DIAG=diag,
    )
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE.read_text()


@functools.cache
def _compile(cfg: ClusterConfig, chunk: int, has_ref: bool, device_index: int, diag: int = 0) -> _Compiled:
    props = torch.cuda.get_device_properties(device_index)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
    stage_vec = stage_vectors(cfg, chunk, smem_sm, _device_limits(device_index)[1])
    src = kernel_source(cfg, chunk, has_ref, stage_vec, diag)
    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(src, _KERNEL, compute_capability=f"{major}{minor}")
        smem = chunk * 2 + stage_vec * 16
        kernel.set_shared_memory_config(smem)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    regs = ctypes.c_int()
    static = ctypes.c_int()
    lib.cuFuncGetAttribute(ctypes.byref(regs), 4, kernel.func)  # CU_FUNC_ATTRIBUTE_NUM_REGS
    lib.cuFuncGetAttribute(ctypes.byref(static), 1, kernel.func)  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    per_cta_smem = smem + static.value + 1024  # + the 1 KB the hardware reserves per CTA
    occ = max(1, min(smem_sm // per_cta_smem, regs_sm // max(1, regs.value * cfg.threads), 2048 // cfg.threads))
    max_clusters = _max_active_clusters(lib, kernel.func, cfg, smem)
    if cfg.ctas_per_sm:
        occ = cfg.ctas_per_sm
        resident = props.multi_processor_count * occ // cfg.cluster
    else:
        resident = max_clusters or props.multi_processor_count * occ // cfg.cluster
    return _Compiled(kernel.func, smem, occ, regs.value, stage_vec, max_clusters, max(1, resident))


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.c_void_p),
        ("numAttrs", ctypes.c_uint),
    ]


def _max_active_clusters(lib: ctypes.CDLL, func: ctypes.c_void_p, cfg: ClusterConfig, smem: int) -> int:
    """Clusters the GPU runs at once (the driver knows how clusters pack into GPCs); 0 if it cannot say.

    The grid must not exceed it: the kernel is persistent, so a cluster that waits for a free slot would run all
    of its rows after the others finished."""
    conf = _LaunchConfig(cfg.cluster * 1024, 1, 1, cfg.threads, 1, 1, smem, None, None, 0)
    n = ctypes.c_int(0)
    try:
        if lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(conf)) != 0:
            return 0
    except AttributeError:
        return 0
    return n.value


def launch(
    cfg: ClusterConfig,
    x: torch.Tensor,
    x_strides: tuple[int, int],
    dx: torch.Tensor,
    dx_strides: tuple[int, int],
    l_inner: int,
    n_rows: int,
    vocab: int,
    tgt: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    adv: torch.Tensor,
    w: torch.Tensor,
    loss_tok: torch.Tensor,
    logp: torch.Tensor,
    ent: torch.Tensor,
    clip: torch.Tensor,
    kl: torch.Tensor,
    vocab_start: int,
    scale2: float,
    inv_tau: float,
    eps_low: float,
    eps_high: float,
    beta: float,
    has_ref: bool,
) -> dict:
    """Enqueue the kernel on the current stream; returns launch details (grid, registers, occupancy)."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    chunk = _chunk(vocab, cfg.cluster)
    comp = _compile(cfg, chunk, has_ref, dev, DIAG)
    clusters = max(1, min(n_rows, comp.resident))
    # per-token inputs as the kernel reads them (T elements each: negligible next to the logits)
    tgt = tgt.to(torch.int64).contiguous()
    old, ref, adv, w = (t.to(torch.float32).contiguous() for t in (old, ref, adv, w))
    keep = (tgt, old, ref, adv, w)  # alive until the launch is enqueued
    values = [
        ctypes.c_void_p(x.data_ptr()),
        ctypes.c_longlong(x_strides[0]),
        ctypes.c_longlong(x_strides[1]),
        ctypes.c_void_p(dx.data_ptr()),
        ctypes.c_longlong(dx_strides[0]),
        ctypes.c_longlong(dx_strides[1]),
        ctypes.c_int(max(1, l_inner)),
        *(ctypes.c_void_p(t.data_ptr()) for t in keep[:5]),
        *(ctypes.c_void_p(t.data_ptr()) for t in (loss_tok, logp, ent, clip, kl)),
        ctypes.c_int(n_rows),
        ctypes.c_longlong(vocab),
        ctypes.c_longlong(vocab_start),
        *(ctypes.c_float(v) for v in (scale2, inv_tau, eps_low, eps_high, beta)),
    ]
    args = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
    lib = torch.cuda._utils._get_gpu_runtime_library()
    stream = torch.cuda.current_stream(dev)
    err = lib.cuLaunchKernel(
        comp.func, clusters * cfg.cluster, 1, 1, cfg.threads, 1, 1, comp.smem, ctypes.c_void_p(stream.cuda_stream),
        args, None,
    )  # fmt: skip
    torch.cuda._utils._check_cuda(err)
    del keep
    return dict(
        grid=clusters * cfg.cluster,
        clusters=clusters,
        max_active_clusters=comp.max_clusters,
        occupancy=comp.occupancy,
        n_regs=comp.n_regs,
        stage_vec=comp.stage_vec,
        chunk=chunk,
    )
