"""Do two evaluations of the same checkpoint agree within sampling noise? (megatron engine vs SGLang, issue 11).

Per set: each run's pass@1 with its standard error over problems (``pass@1_se``: the sample std of the per-problem
means / sqrt(n), so the k samples of one problem count as one cluster, not k independent draws), and the
two-sample z-test on them: z = (p_a - p_b) / sqrt(se_a^2 + se_b^2); the runs agree when |z| < ``z_crit`` (1.96:
5 % two-sided). The paired difference over the shared problems (same problem, both engines) is reported too; it is
the stricter test (the two runs' errors on a problem are correlated), for information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1mega.eval.metrics import mean, standard_error
from r1mega.eval.results import EvalResults


@dataclass(frozen=True)
class SetComparison:
    name: str
    problems: int
    pass1_a: float
    se_a: float
    pass1_b: float
    se_b: float
    z: float  # (a - b) / sqrt(se_a^2 + se_b^2)
    paired_z: float  # mean(d) / se(d), d = per-problem pass@1 difference
    agree: bool  # |z| < z_crit


def _per_problem(results: EvalResults, name: str) -> dict[int, float]:
    return {p.index: p.num_correct / len(p.samples) for p in results.sets[name].problems}


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def compare_results(a: EvalResults, b: EvalResults, z_crit: float = 1.96) -> list[SetComparison]:
    """One row per set present in both runs, on the problems both evaluated."""
    out = []
    for name in (n for n in a.sets if n in b.sets):
        pa, pb = _per_problem(a, name), _per_problem(b, name)
        shared = sorted(pa.keys() & pb.keys())
        if not shared:
            continue
        xa, xb = [pa[i] for i in shared], [pb[i] for i in shared]
        ma, mb, sa, sb = mean(xa), mean(xb), standard_error(xa), standard_error(xb)
        z = _ratio(ma - mb, math.sqrt(sa**2 + sb**2))
        d = [x - y for x, y in zip(xa, xb)]
        out.append(SetComparison(name, len(shared), ma, sa, mb, sb, z, _ratio(mean(d), standard_error(d)),
                                 abs(z) < z_crit))  # fmt: skip
    return out


def format_comparison(rows: list[SetComparison], label_a: str = "a", label_b: str = "b") -> str:
    lines = [f"{'set':10s} {'n':>5s} {label_a + ' pass@1':>18s} {label_b + ' pass@1':>18s} {'z':>6s} "
             f"{'paired z':>8s}  within noise (|z|<1.96)"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r.name:10s} {r.problems:5d} {100 * r.pass1_a:9.2f} +- {100 * r.se_a:4.2f} "
            f"{100 * r.pass1_b:9.2f} +- {100 * r.se_b:4.2f} {r.z:6.2f} {r.paired_z:8.2f}  {'yes' if r.agree else 'NO'}"
        )
    return "\n".join(lines)
