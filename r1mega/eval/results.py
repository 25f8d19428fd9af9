"""What an evaluation produces: every sample, every vote, every problem, and the per-set summary.

The JSON written by :func:`save_results` holds all of it; :func:`load_results` rebuilds the same objects, and
:func:`summarize` recomputes a set's summary from its problems alone (so a saved file can be re-scored offline or
checked against what was logged).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1mega.eval.metrics import Vote, default_pass_at, mean, pass_at_k, standard_error

FORMAT_VERSION = 1


@dataclass
class SampleResult:
    """One generated answer: its text (unless responses are not kept), extracted answer and scores."""

    answer: str | None  # the extracted final answer (None: no <answer> tag nor \boxed{})
    correct: bool
    format: bool  # R1's <think>..</think><answer>..</answer> format
    length: int  # generated tokens (the EOS included when the answer finished)
    finished: bool  # stopped by EOS, not by max_new_tokens
    response: str | None = None


@dataclass
class ProblemResult:
    index: int  # row of the problem in its set
    question: str
    gold: str
    samples: list[SampleResult]
    votes: list[Vote]  # answer clusters in order of first occurrence
    voted: str | None  # the majority answer (None: no sample gave an answer)
    cons_correct: bool

    @property
    def num_correct(self) -> int:
        return sum(s.correct for s in self.samples)


@dataclass
class SetResult:
    name: str
    problems: list[ProblemResult]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResults:
    settings: dict[str, Any]
    sets: dict[str, SetResult]
    wall_s: float = 0.0
    generation_s: float = 0.0
    generated_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # model / checkpoint / config, for the reader

    @property
    def gen_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}/{set}/{metric}``: what goes to wandb / metrics.jsonl."""
        out = {f"{prefix}/{name}/{k}": v for name, s in self.sets.items() for k, v in s.metrics.items()}
        out[f"{prefix}/wall_s"] = self.wall_s
        out[f"{prefix}/gen_tokens_per_s"] = self.gen_tokens_per_s
        return out


def summarize(problems: list[ProblemResult], pass_at: list[int] | tuple[int, ...] = ()) -> dict[str, float]:
    """A set's numbers from its problems: pass@1 (+ its standard error), pass@k', cons@n, and the format,
    answer, length and truncation statistics. Every problem must have the same number of samples n."""
    if not problems:
        return {"num_problems": 0.0}
    n = len(problems[0].samples)
    if any(len(p.samples) != n for p in problems):
        raise ValueError("every problem needs the same number of samples")
    per_problem = [p.num_correct / n for p in problems]
    samples = [s for p in problems for s in p.samples]
    out = {"num_problems": float(len(problems)), "samples_per_problem": float(n)}
    out["pass@1"] = mean(per_problem)
    out["pass@1_se"] = standard_error(per_problem)
    for k in sorted(set(pass_at or default_pass_at(n))):
        if 1 < k <= n:
            out[f"pass@{k}"] = mean([pass_at_k(n, p.num_correct, k) for p in problems])
    out[f"cons@{n}"] = mean([float(p.cons_correct) for p in problems])
    out["format_rate"] = mean([float(s.format) for s in samples])
    out["answer_rate"] = mean([float(s.answer is not None) for s in samples])
    out["length_mean"] = mean([float(s.length) for s in samples])
    out["length_max"] = float(max(s.length for s in samples))
    out["truncated_frac"] = mean([float(not s.finished) for s in samples])
    return out


def _clean(x: Any) -> Any:
    """NaN -> None: JSON has no NaN (``json.dumps`` would write an invalid token)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def to_dict(results: EvalResults) -> dict[str, Any]:
    return _clean(
        {
            "format_version": FORMAT_VERSION,
            "settings": results.settings,
            "meta": results.meta,
            "wall_s": results.wall_s,
            "generation_s": results.generation_s,
            "generated_tokens": results.generated_tokens,
            "summary": {name: s.metrics for name, s in results.sets.items()},
            "sets": {
                name: [{**asdict(p), "num_correct": p.num_correct} for p in s.problems]
                for name, s in results.sets.items()
            },
        }
    )


def from_dict(d: dict[str, Any]) -> EvalResults:
    if d.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"eval results format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
    nan = float("nan")
    sets = {}
    for name, rows in d["sets"].items():
        problems = [
            ProblemResult(
                index=r["index"],
                question=r["question"],
                gold=r["gold"],
                samples=[SampleResult(**s) for s in r["samples"]],
                votes=[Vote(**v) for v in r["votes"]],
                voted=r["voted"],
                cons_correct=r["cons_correct"],
            )
            for r in rows
        ]
        metrics = {k: (nan if v is None else v) for k, v in d["summary"][name].items()}
        sets[name] = SetResult(name, problems, metrics)
    return EvalResults(d["settings"], sets, d["wall_s"], d["generation_s"], d["generated_tokens"], d.get("meta", {}))


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


def save_results(results: EvalResults, path: str | Path) -> Path:
    return write_json(to_dict(results), path)


def load_results(path: str | Path) -> EvalResults:
    return from_dict(json.loads(Path(path).read_text()))
