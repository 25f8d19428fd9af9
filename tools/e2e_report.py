"""The report of tools/bench_e2e_trl.py: one markdown table (per-step time split, tokens/s, peak GPU memory,
GSM8K-test accuracy before / after for r1mega and TRL) and the PNG curves, from the files a run leaves in ``out``
(on the GPU machine, or here from the unpacked ``e2e_results.tgz``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _eval(out: Path, name: str) -> dict[str, float]:
    p = out / name / "eval.json"
    return json.loads(p.read_text())["summary"]["gsm8k"] if p.is_file() else {}


def report(out: Path, stages: dict[str, dict]) -> str:
    """The table (markdown, also written to out/e2e_table.md) and out/e2e_curves.png."""
    runs = {"r1mega": _rows(out / "r1mega" / "metrics.jsonl"), "TRL": _rows(out / "trl" / "metrics.jsonl")}
    runs = {k: [r for r in v if "time/step" in r] for k, v in runs.items()}
    med = lambda rows, k: statistics.median([r[k] for r in rows if r.get(k) is not None]) if rows else float("nan")  # noqa: E731
    final = {"r1mega": "r1mega_final", "TRL": "trl_final"}
    lines = [
        "| | r1mega | TRL 1.16 (HF generate) |", "|---|---|---|",
        *[f"| median {k} (s) | {med(runs['r1mega'], 'time/' + k):.2f} | {med(runs['TRL'], 'time/' + k):.2f} |"
          for k in ("step", "generation", "logprobs", "training", "weight_update", "reward")],
        f"| tokens/s (median) | {med(runs['r1mega'], 'perf/tokens_per_s'):.0f} | "
        f"{med(runs['TRL'], 'perf/tokens_per_s'):.0f} |",
        f"| peak GPU memory (nvidia-smi, GiB) | {stages.get('r1mega', {}).get('peak_gpu_mib', 0) / 1024:.1f} | "
        f"{stages.get('trl', {}).get('peak_gpu_mib', 0) / 1024:.1f} |",
        f"| steps / stage wall (s) | {len(runs['r1mega'])} / {stages.get('r1mega', {}).get('wall_s', 0):.0f} | "
        f"{len(runs['TRL'])} / {stages.get('trl', {}).get('wall_s', 0):.0f} |",
    ]  # fmt: skip
    cold_g, cold_k = _eval(out, "eval_cold_greedy"), _eval(out, "eval_cold_k8")
    lines += ["", "| GSM8K test (1319) | greedy acc | +- se | pass@1 (k=8) | format rate |", "|---|---|---|---|---|"]
    for label, ck in (("cold start", "cold"), ("r1mega after", final["r1mega"]), ("TRL after", final["TRL"])):
        g, k = (cold_g, cold_k) if ck == "cold" else (_eval(out, f"eval_{ck}_greedy"), _eval(out, f"eval_{ck}_k8"))
        lines.append(f"| {label} | {g.get('pass@1', float('nan')):.4f} | {g.get('pass@1_se', float('nan')):.4f} | "
                     f"{k.get('pass@1', float('nan')):.4f} | {g.get('format_rate', float('nan')):.3f} |")  # fmt: skip
    table = "\n".join(lines)
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
    for ax, (k, title) in zip(axes, keys):
        for name, rows in runs.items():
            pts = [(r["step"] if "step" in r else i + 1, r[k]) for i, r in enumerate(rows) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
