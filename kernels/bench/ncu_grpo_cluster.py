"""Drive the GRPO kernels for Nsight Compute: a few calls at T=32768, V=151936, bf16 (the bench's main shape).

    ncu --clock-control none -k regex:r1k_grpo --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        python3 kernels/bench/ncu_grpo_cluster.py [--cluster 2 --threads 512 | --triton]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo_kernels as B  # noqa: E402
import r1mega_kernels as rk  # noqa: E402
import torch  # noqa: E402
from r1mega_kernels import cuda_grpo, ops  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--cluster", type=int, default=2)
ap.add_argument("--threads", type=int, default=512)
ap.add_argument("--triton", action="store_true", help="profile our Triton kernel instead")
ap.add_argument("--calls", type=int, default=4)
a = ap.parse_args()
ops.GRPO_CLUSTER = None if a.triton else cuda_grpo.ClusterConfig(a.cluster, a.threads)
base, ids, old, ref, _, adv, _, w = B.make_inputs(32768, 151936, 2048)
x = base[:, :-1].detach().requires_grad_()
for _ in range(a.calls):
    lo, st = rk.grpo_loss(x, ids, old, ref, adv, w, B.EPS_LOW, B.EPS_HIGH, B.BETA, B.TAU)
    B.grads_of(lo, x)
torch.cuda.synchronize()
print(ops.LAST_GRPO_PATH)
