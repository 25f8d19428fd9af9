"""Showing and keeping an evaluation: a rich table on the terminal, the per-problem JSON, the tracker summary."""

from __future__ import annotations

import math
from pathlib import Path

from r1mega.eval.results import EvalResults, save_results

_STATS = ("format_rate", "answer_rate", "length_mean", "truncated_frac")


def _score_columns(results: EvalResults) -> list[str]:
    """pass@1, pass@k' in increasing k', cons@n: the metric names present in any set, in table order."""
    keys = {k for s in results.sets.values() for k in s.metrics}
    passes = sorted((k for k in keys if k.startswith("pass@") and k != "pass@1_se"), key=lambda k: int(k[5:]))
    return passes + sorted(k for k in keys if k.startswith("cons@"))


def _cell(value: float | None, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.0f}"


def render_table(results: EvalResults, title: str | None = None):
    """A rich Table: one row per set; scores in percent (pass@1 with its standard error)."""
    from rich.table import Table

    st = results.settings
    if title is None:
        how = "greedy" if st.get("greedy") else f"k={st.get('k')}, T={st.get('temperature')}, top-p={st.get('top_p')}"
        title = f"r1mega-eval ({how}, template {st.get('template')})"
    table = Table(title=title, title_justify="left")
    table.add_column("set")
    table.add_column("problems", justify="right")
    cols = _score_columns(results)
    for c in cols:
        table.add_column(c + (" (+-se)" if c == "pass@1" else ""), justify="right")
    table.add_column("format %", justify="right")
    table.add_column("answered %", justify="right")
    table.add_column("len (tok)", justify="right")
    table.add_column("truncated %", justify="right")
    for name, s in results.sets.items():
        m = s.metrics
        row = [name, _cell(m.get("num_problems"), pct=False)]
        for c in cols:
            cell = _cell(m.get(c))
            if c == "pass@1" and not math.isnan(m.get("pass@1_se", float("nan"))):
                cell += f" +- {100 * m['pass@1_se']:.1f}"
            row.append(cell)
        row += [_cell(m.get(k), pct=k != "length_mean") for k in _STATS]
        table.add_row(*row)
    table.caption = (
        f"{results.wall_s:.1f} s wall, {results.generated_tokens} tokens generated "
        f"({results.gen_tokens_per_s:.0f} tokens/s in generation)"
    )
    return table


def print_table(results: EvalResults, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal and console.width < 160:
        console.width = 160  # a log file or pipe gets 80 columns from rich: too narrow for the table
    console.print(render_table(results))


def report(
    results: EvalResults, json_path: str | Path | None, tracker=None, step: int = 0, console=None, prefix: str = "eval"
) -> None:
    """Print the table, write the JSON (when a path is given) and log the flat summary to ``tracker``
    (:class:`r1mega.tracking.Tracker`: wandb + metrics.jsonl) at ``step``, its keys under ``prefix``."""
    print_table(results, console)
    if json_path is not None:
        path = save_results(results, json_path)
        if console is not None:
            console.print(f"per-problem results: {path}")
    if tracker is not None:
        flat = results.flat_metrics(prefix)
        tracker.log(flat, step=step)
        tracker.summary(flat)
