"""The CUDA cluster kernel's source compiles for sm_90 with NVRTC, on the CPU (no GPU needed), for the launch shapes
the host can pick, without warnings and without large register spills. Its numerics are checked on an sm_90 GPU
(kernels/gpu_tests); this keeps an edit that breaks the build or the register budget from passing CI unnoticed.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (the test extra); PyTorch's CUDA wheels ship the same library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib
import re

import pytest
from r1mega_kernels import cuda_grpo

H100_SMEM_PER_SM, H100_SMEM_PER_BLOCK = 233472, 232448  # Hopper shared memory (bytes), as the device reports it


def _nvrtc() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for lib in sorted(pathlib.Path(d).glob("*/lib/libnvrtc.so*")):
            return ctypes.CDLL(str(lib))
    return None


NVRTC = _nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="NVRTC not installed (pip install nvidia-cuda-nvrtc)")


def _compile(src: str) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"grpo_cluster.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90", b"-std=c++17", b"--ptxas-options=-v"]
    res = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    return res, log.value.decode(errors="replace")


@pytest.mark.parametrize(
    "cluster,threads,min_blocks,stage,vocab,has_ref",
    [
        (2, 512, 1, True, 151936, True),  # the default launch, Qwen vocabulary
        (2, 512, 1, True, 128256, False),  # Llama-3 vocabulary, no reference model
        (2, 1024, 1, True, 151936, True),
        (2, 512, 1, False, 151936, True),
        (4, 256, 2, True, 151936, True),  # two CTAs per SM
        (8, 256, 1, True, 40, True),  # tiny vocabulary: empty CTAs, staging smaller than a round
    ],
)
def test_cluster_kernel_compiles_for_sm90(cluster, threads, min_blocks, stage, vocab, has_ref) -> None:
    cfg = cuda_grpo.ClusterConfig(cluster=cluster, threads=threads, min_blocks=min_blocks, stage=stage)
    chunk = cuda_grpo._chunk(vocab, cluster)
    stage_vec = cuda_grpo.stage_vectors(cfg, chunk, H100_SMEM_PER_SM, H100_SMEM_PER_BLOCK)
    assert chunk * 2 + stage_vec * 16 <= H100_SMEM_PER_BLOCK - 1024  # the dynamic shared memory the launch asks
    res, log = _compile(cuda_grpo.kernel_source(cfg, chunk, has_ref, stage_vec))
    assert res == 0, log
    assert "warning" not in log.lower(), log
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    assert regs * threads * min_blocks <= 65536, log
    # the slice lives in registers: a spill of the slice would be ~100x this; a few words of loop state may spill
    assert spills <= 32, log
