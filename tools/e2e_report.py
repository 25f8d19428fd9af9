"""The report of tools/bench_e2e_trl.py: one markdown table (per-step time split, tokens/s, peak GPU memory,
GSM8K-test accuracy before / after for r1mega and TRL) and the PNG curves, from the files a run leaves in ``out``
(on the GPU machine, or here from the unpacked ``e2e_results.tgz``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


CHECKPOINTS = (("cold start", "cold"), ("r1mega after", "r1mega_final"), ("TRL after", "trl_final"),
               ("r1mega FP8 after", "r1mega_fp8_final"))  # fmt: skip
OPTIONAL = {"r1mega_fp8_final"}  # a row only when it was evaluated


class Partial:
    """An evaluation that did not finish (the machine lost, a time limit): only its ``eval*_progress.json``, the
    running numbers of the chunks done (r1mega/eval/runner.py write_progress), no per-problem results."""

    def __init__(self, path: Path) -> None:
        d = json.loads(path.read_text())
        self.chunks = f"{d['chunks_done']}/{d['chunks']}"
        self.sets = {name: SimpleNamespace(metrics=m, problems=[]) for name, m in d["sets"].items()}


def _evals(out: Path, ck: str):
    """(greedy, k-sampled) results of one checkpoint's ``eval_<ck>`` stage: EvalResults, a Partial where only the
    progress file is there, None where missing."""
    from r1mega.eval.results import load_results

    got = []
    for stem in ("eval_greedy", "eval"):
        path, progress = out / f"eval_{ck}" / f"{stem}.json", out / f"eval_{ck}" / f"{stem}_progress.json"
        got.append(load_results(path) if path.is_file() else Partial(progress) if progress.is_file() else None)
    return tuple(got)


def _pct(res, key: str, se: bool = False, scale: float = 100) -> str:
    """A metric of the GSM8K set in percent (``scale`` 1: as is), with its standard error; "-" when not run."""
    if res is None or key not in res.sets.get("gsm8k", SimpleNamespace(metrics={})).metrics:
        return "-"
    m = res.sets["gsm8k"].metrics
    err = m.get(key + "_se", float("nan"))  # a progress file of before 2026-12-06 has none
    return f"{scale * m[key]:.{2 if scale == 100 else 0}f}" + (f" +- {100 * err:.2f}" if se else "")


def _delta(res, base) -> str:
    """After - cold on the same problems: the difference, its unpaired z and paired z (r1mega/eval/compare.py)."""
    from r1mega.eval.compare import compare_results

    if res is None or base is None:
        return "-"
    if isinstance(res, Partial) or isinstance(base, Partial):  # no per-problem results: the unpaired z only
        a, b = res.sets["gsm8k"].metrics, base.sets["gsm8k"].metrics
        se = (a.get("pass@1_se", float("nan")) ** 2 + b.get("pass@1_se", float("nan")) ** 2) ** 0.5
        return f"{100 * (a['pass@1'] - b['pass@1']):+.2f} (z {(a['pass@1'] - b['pass@1']) / se:.1f}, partial)"
    (c,) = compare_results(res, base)
    return f"{100 * (c.pass1_a - c.pass1_b):+.2f} (z {c.z:.1f}, paired {c.paired_z:.1f})"


def accuracy_table(out: Path) -> tuple[list[str], dict[str, float]]:
    """GSM8K test before / after for both sides; and each side's pass@1 gain (k samples) in points."""
    from r1mega.eval.results import EvalResults

    evals = {ck: _evals(out, ck) for _, ck in CHECKPOINTS}
    cold_g, cold_k = evals["cold"]
    if isinstance(cold_g, EvalResults) and "gsm8k" in cold_g.sets:
        n = len(cold_g.sets["gsm8k"].problems)
    else:  # the cold start's greedy evaluation cut off (its problems so far) or missing
        n = cold_g.sets["gsm8k"].metrics.get("problems", "?") if isinstance(cold_g, Partial) else "?"
    lines = [f"| GSM8K test ({n} problems) | greedy % +- se | pass@1 % +- se (k=8) | cons@8 % | pass@8 % | format % "
             "(greedy / k=8) | len (tok, k=8) | greedy vs cold: points (z, paired z) | pass@1 vs cold |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    gains = {}
    for label, ck in CHECKPOINTS:
        g, k = evals[ck]
        if ck in OPTIONAL and g is None and k is None:
            continue
        partial = [f"{what} {r.chunks} chunks" for what, r in (("greedy", g), ("k=8", k)) if isinstance(r, Partial)]
        label += f" (partial: {', '.join(partial)})" if partial else ""
        lines.append(
            f"| {label} | {_pct(g, 'pass@1', True)} | {_pct(k, 'pass@1', True)} | {_pct(k, 'cons@8')} | "
            f"{_pct(k, 'pass@8')} | {_pct(g, 'format_rate')} / {_pct(k, 'format_rate')} | "
            f"{_pct(k, 'length_mean', scale=1)} | "
            f"{'' if ck == 'cold' else _delta(g, cold_g)} | {'' if ck == 'cold' else _delta(k, cold_k)} |"
        )
        if ck != "cold" and k is not None and cold_k is not None:
            gains[ck] = 100 * (k.sets["gsm8k"].metrics["pass@1"] - cold_k.sets["gsm8k"].metrics["pass@1"])
    return lines, gains


def report(out: Path, stages: dict[str, dict]) -> str:
    """The table (markdown, also written to out/e2e_table.md) and out/e2e_curves.png."""
    runs = {"r1mega": _rows(out / "r1mega" / "metrics.jsonl"), "TRL": _rows(out / "trl" / "metrics.jsonl")}
    runs = {k: [r for r in v if "time/step" in r] for k, v in runs.items()}
    med = lambda rows, k: statistics.median([r[k] for r in rows if r.get(k) is not None]) if rows else float("nan")  # noqa: E731
    rl_min = {k: sum(r["time/step"] for r in v) / 60 for k, v in runs.items()}  # GPU minutes in the RL loop
    gap = [r["rollout/logp_diff_mean"] for r in runs["r1mega"] if r.get("rollout/logp_diff_mean") is not None]
    lines = [
        "| | r1mega | TRL 1.16 (HF generate) |", "|---|---|---|",
        *[f"| median {k} (s) | {med(runs['r1mega'], 'time/' + k):.2f} | {med(runs['TRL'], 'time/' + k):.2f} |"
          for k in ("step", "generation", "logprobs", "training", "weight_update", "reward")],
        f"| tokens/s (median) | {med(runs['r1mega'], 'perf/tokens_per_s'):.0f} | "
        f"{med(runs['TRL'], 'perf/tokens_per_s'):.0f} |",
        f"| peak GPU memory (nvidia-smi, GiB) | {stages.get('r1mega', {}).get('peak_gpu_mib', 0) / 1024:.1f} | "
        f"{stages.get('trl', {}).get('peak_gpu_mib', 0) / 1024:.1f} |",
        f"| steps / RL minutes / stage wall (s) | {len(runs['r1mega'])} / {rl_min['r1mega']:.2f} / "
        f"{stages.get('r1mega', {}).get('wall_s', 0):.0f} | {len(runs['TRL'])} / {rl_min['TRL']:.2f} / "
        f"{stages.get('trl', {}).get('wall_s', 0):.0f} |",
        f"| SGLang vs trainer mean \\|dlogp\\| per step: median (max) | "
        f"{(statistics.median(gap) if gap else float('nan')):.4f} ({max(gap, default=float('nan')):.4f}) | - |",
    ]  # fmt: skip
    acc, gains = accuracy_table(out)
    per_min = [gains.get(ck, float("nan")) / m if m else float("nan") for ck, m in
               (("r1mega_final", rl_min["r1mega"]), ("trl_final", rl_min["TRL"]))]  # fmt: skip
    lines.append(f"| pass@1 gain per RL GPU-minute (points) | {per_min[0]:.3f} | {per_min[1]:.3f} |")
    if fp8 := [r for r in _rows(out / "r1mega_fp8" / "metrics.jsonl") if "time/step" in r]:  # the FP8 run, if any
        fp8_min = sum(r["time/step"] for r in fp8) / 60
        lines.append(f"| r1mega FP8: median step / training (s), steps, pass@1 gain per RL GPU-minute | "
                     f"{med(fp8, 'time/step'):.2f} / {med(fp8, 'time/training'):.2f}, {len(fp8)}, "
                     f"{gains.get('r1mega_fp8_final', float('nan')) / fp8_min:.3f} | (bf16: "
                     f"{med(runs['r1mega'], 'time/step'):.2f} / "
                     f"{med(runs['r1mega'], 'time/training'):.2f}) |")  # fmt: skip
        runs["r1mega FP8"] = fp8
    table = "\n".join([*lines, "", *acc])
    (out / "e2e_table.md").write_text(table + "\n")
    _plot(runs, out / "e2e_curves.png")
    return table


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward/mean", "reward"), ("reward/accuracy", "train accuracy"),
            ("response/length_mean", "response length"), ("train/kl", "KL to reference"),
            ("rollout/logp_diff_mean", "|dlogp| engine vs trainer")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per run in every panel
    for ax, (k, title) in zip(axes, keys):
        for name, rows in runs.items():
            pts = [(r["step"] if "step" in r else i + 1, r[k]) for i, r in enumerate(rows) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, color=colors[name])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
