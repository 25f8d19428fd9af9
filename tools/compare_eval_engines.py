"""Compare two ``r1mega-eval`` runs of the same checkpoint (e.g. ``rollout=megatron`` vs ``rollout=sglang``):
each set's pass@1 (and answered / format / finished rates) with its standard error, the z statistic, and whether
they agree within sampling noise (two-sample z-test on the per-problem standard errors, |z| < 1.96; see
r1mega/eval/compare.py).

    python tools/compare_eval_engines.py runs/eval_megatron/eval.json runs/eval_sglang/eval.json \\
        --labels megatron sglang

Exit status 0 when every shared set agrees on every metric, 1 otherwise. The recipe (both commands) is in
docs/perf/eval.md.
"""

from __future__ import annotations

import argparse
import sys

from r1mega.eval.compare import METRICS, compare_results, format_comparison
from r1mega.eval.results import load_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="eval.json of the first run")
    ap.add_argument("b", help="eval.json of the second run")
    ap.add_argument("--labels", nargs=2, default=("megatron", "sglang"))
    ap.add_argument("--z", type=float, default=1.96, help="critical |z| (1.96: 5%% two-sided)")
    ap.add_argument("--metrics", default=",".join(METRICS), help="per-sample rates compared (all must agree)")
    args = ap.parse_args(argv)
    a, b = load_results(args.a), load_results(args.b)
    for label, r in zip(args.labels, (a, b)):
        s = r.settings
        print(f"{label}: {args.a if r is a else args.b} (k={s.get('k')}, greedy={s.get('greedy')}, "
              f"T={s.get('temperature')}, template {s.get('template')})")  # fmt: skip
    rows = compare_results(a, b, args.z, tuple(args.metrics.split(",")))
    if not rows:
        print("no set (and problem) in common", file=sys.stderr)
        return 2
    print(format_comparison(rows, *args.labels))
    return 0 if all(r.agree for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
