"""Benchmark: PromptSampler.batch, the original per-prompt reshuffle vs the cached per-epoch permutation.

    PYTHONPATH=$PWD python tools/bench_prompt_sampler.py                # 20k / 200k / 1M rows, 512 prompts
    PYTHONPATH=$PWD python tools/bench_prompt_sampler.py --old-prompts 512   # time the old one on a full batch

The old implementation shuffles the whole dataset once per prompt, so a full 512-prompt batch at 1M rows takes
minutes; by default it is timed on ``--old-prompts`` prompts and scaled to a batch (it is exactly linear in the
number of prompts: one identical shuffle each). Both are checked to return the same problems. The new sampler
is timed cold (the first batch of an epoch builds the permutation) and warm (every other batch of the epoch).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from r1mega.data.sampler import PromptSampler
from r1mega.data.tasks import Problem


def old_batch(problems: list[Problem], per_step: int, step: int, limit: int | None = None) -> list[Problem]:
    """The original ``PromptSampler.batch`` (dp_size 1), optionally only its first ``limit`` prompts."""
    out = []
    for k in range(step * per_step, step * per_step + (limit or per_step)):
        epoch, i = divmod(k, len(problems))
        order = list(range(len(problems)))
        random.Random(1 + epoch).shuffle(order)
        out.append(problems[order[i]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    ap.add_argument("--prompts", type=int, default=512, help="prompts per step (the r1_zero preset: 512)")
    ap.add_argument("--old-prompts", type=int, default=4, help="prompts the old sampler is timed on")
    ap.add_argument("--warm-batches", type=int, default=50)
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, {args.prompts} prompts/step")
    print("| rows | old: s / batch | new cold: ms (1st batch of an epoch) | new warm: ms / batch (median) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.rows:
        problems = [Problem(f"q{i}", str(i)) for i in range(n)]
        step = 3
        t0 = time.perf_counter()
        ref = old_batch(problems, args.prompts, step, args.old_prompts)
        old_s = (time.perf_counter() - t0) * args.prompts / args.old_prompts
        sampler = PromptSampler(problems, args.prompts, 0, 1, seed=1)
        t0 = time.perf_counter()
        got = sampler.batch(step)
        cold_ms = (time.perf_counter() - t0) * 1e3
        assert got[: len(ref)] == ref, "new sampler disagrees with the original order"
        warm = []
        for s in range(step + 1, step + 1 + args.warm_batches):
            t0 = time.perf_counter()
            sampler.batch(s)
            warm.append((time.perf_counter() - t0) * 1e3)
        warm_ms = statistics.median(warm)
        print(f"| {n:,} | {old_s:.2f} | {cold_ms:.1f} | {warm_ms:.3f} | {old_s * 1e3 / warm_ms:,.0f}x |")


if __name__ == "__main__":
    main()
