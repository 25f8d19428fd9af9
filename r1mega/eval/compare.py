"""Do two evaluations of the same checkpoint agree within sampling noise? (megatron engine vs SGLang, issue 11).

Per set: each run's pass@1 with its standard error over problems (``pass@1_se``: the sample std of the per-problem
means / sqrt(n), so the k samples of one problem count as one cluster, not k independent draws), and the
two-sample z-test on them: z = (p_a - p_b) / sqrt(se_a^2 + se_b^2); the runs agree when |z| < ``z_crit`` (1.96:
5 % two-sided). The paired difference over the shared problems (same problem, both engines) is reported too; it is
the stricter test (the two runs' errors on a problem are correlated), for information.

The same test runs on the other per-sample rates (``METRICS``): whether an answer was extracted, the R1 format,
whether the answer finished before ``max_new_tokens``. A model that scores ~0 % (SmolLM2 on GSM8K) makes the
pass@1 test uninformative; these rates still tell two engines apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1mega.eval.metrics import mean, standard_error
from r1mega.eval.results import EvalResults

# metric -> the per-sample indicator whose per-problem mean is compared
METRICS = {
    "pass@1": lambda s: s.correct,
    "answered": lambda s: s.answer is not None,
    "format": lambda s: s.format,
    "finished": lambda s: s.finished,
}


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
    metric: str = "pass@1"


def _per_problem(results: EvalResults, name: str, metric: str = "pass@1") -> dict[int, float]:
    f = METRICS[metric]
    return {p.index: sum(map(f, p.samples)) / len(p.samples) for p in results.sets[name].problems}


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def compare_results(
    a: EvalResults, b: EvalResults, z_crit: float = 1.96, metrics: tuple[str, ...] = ("pass@1",)
) -> list[SetComparison]:
    """One row per set present in both runs and metric, on the problems both evaluated."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    out = []
    for name, metric in ((n, m) for n in a.sets if n in b.sets for m in metrics):
        pa, pb = _per_problem(a, name, metric), _per_problem(b, name, metric)
        shared = sorted(pa.keys() & pb.keys())
        if not shared:
            continue
        xa, xb = [pa[i] for i in shared], [pb[i] for i in shared]
        ma, mb, sa, sb = mean(xa), mean(xb), standard_error(xa), standard_error(xb)
        z = _ratio(ma - mb, math.sqrt(sa**2 + sb**2))
        d = [x - y for x, y in zip(xa, xb)]
        out.append(SetComparison(name, len(shared), ma, sa, mb, sb, z, _ratio(mean(d), standard_error(d)),
                                 abs(z) < z_crit, metric))  # fmt: skip
    return out


def format_comparison(rows: list[SetComparison], label_a: str = "a", label_b: str = "b") -> str:
    lines = [f"{'set':10s} {'metric':9s} {'n':>5s} {label_a + ' %':>18s} {label_b + ' %':>18s} {'z':>6s} "
             f"{'paired z':>8s}  within noise (|z|<1.96)"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r.name:10s} {r.metric:9s} {r.problems:5d} {100 * r.pass1_a:9.2f} +- {100 * r.se_a:4.2f} "
            f"{100 * r.pass1_b:9.2f} +- {100 * r.se_b:4.2f} {r.z:6.2f} {r.paired_z:8.2f}  {'yes' if r.agree else 'NO'}"
        )
    return "\n".join(lines)
