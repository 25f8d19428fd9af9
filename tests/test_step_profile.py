"""tools/step_profile.py: the GPU-busy union against brute force, and kernels bucketed by the op that launched them."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import step_profile  # noqa: E402

CUDA, CPU = SimpleNamespace(name="CUDA"), SimpleNamespace(name="CPU")


def _kernel(start: float, end: float):
    return SimpleNamespace(device_type=CUDA, time_range=SimpleNamespace(start=start, end=end))


def test_busy_time_is_the_union_of_overlapping_kernels():
    rng = random.Random(0)
    spans = [(s := rng.randrange(0, 1000), s + rng.randrange(1, 60)) for _ in range(300)]
    covered = {t for s, e in spans for t in range(s, e)}  # unit-time cells, brute force
    assert step_profile._busy_us([_kernel(s, e) for s, e in spans]) == len(covered)


def _op(name: str, parent=None):
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_kernels_go_to_the_part_their_ancestors_name():
    grouped = _op("autograd::engine::evaluate_function: _GroupedLinearBackward")
    assert step_profile._bucket(_op("aten::mm", grouped), "nvjet_sm90_tst") == "experts"  # not "gemm"
    assert step_profile._bucket(_op("aten::mm", _op("_Linear")), "nvjet_sm90_tst") == "gemm"
    head = _op("LinearWithGradAccumulationAndAsyncCommunication")
    assert step_profile._bucket(_op("aten::matmul", head), "nvjet") == "lm_head"
    assert step_profile._bucket(_op("FusedAttnFuncBackward"), "cudnn_generated_fort_native_sdpa") == "attention"
    # no ancestor names the part: the kernel's own name decides, else "other"
    assert step_profile._bucket(_op("aten::copy_"), "flash_fwd_kernel") == "attention"
    assert step_profile._bucket(_op("aten::add_"), "vectorized_elementwise_kernel") == "other"


def _launch(name: str, parent, kernel: str, us: float):
    k = [SimpleNamespace(name=kernel, duration=us)]
    return SimpleNamespace(name=name, cpu_parent=parent, kernels=k, device_type=CPU)


def _row(key: str, count: int, us: float):
    return SimpleNamespace(key=key, count=count, cpu_time_total=us, self_cpu_time_total=us, device_type=CPU)


def test_analyse_sums_kernels_per_bucket_and_counts_syncs():
    events = [
        _launch("aten::mm", _op("_GroupedLinear"), "nvjet_x", 3000.0),
        _launch("aten::add_", None, "elementwise", 1000.0),
        _kernel(0, 3000),
        _kernel(2000, 4000),
    ]
    rows = [_row("cudaStreamSynchronize", 4, 5000.0), _row("cudaLaunchKernel", 2, 10.0)]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: rows)
    a = step_profile.analyse(prof, wall_s=0.008)
    assert a["ms"]["experts"] == 3.0 and a["ms"]["other"] == 1.0
    assert a["busy"] == 0.5  # 4 ms of kernels (the overlap counted once) in an 8 ms step
    assert (a["launches"], a["syncs"], a["sync_ms"]) == (2, 4, 5.0)
    assert "experts=3.0ms" in step_profile.report(a, verbose=True)
