"""Run tracking: wandb (offline by default), a JSONL history, and the reward-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Tracker:
    """Logs on the main rank only; other ranks get a no-op tracker."""

    def __init__(
        self, out_dir: str, mode: str, project: str, run_name: str | None, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []
        self.run = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.out_dir / "metrics.jsonl").open("a")
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, name=run_name, mode=mode, dir=str(self.out_dir), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, float]) -> None:
        if self.enabled and self.run is not None:
            self.run.summary.update(values)

    def plot_rewards(
        self, before: dict[str, float] | None = None, after: dict[str, float] | None = None
    ) -> Path | None:
        """reward_curve.png: training reward / accuracy / format per step, with held-out accuracy marks."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rl = [h for h in self.history if "reward/accuracy" in h]
        steps = [h["step"] for h in rl]
        fig, ax = plt.subplots(figsize=(9, 4))
        for key, label in (
            ("reward/accuracy", "train accuracy"),
            ("reward/format", "train format"),
            ("reward/mean", "train reward (acc + fmt)"),
        ):
            ax.plot(steps, [h[key] for h in rl], label=label)
        for name, ev, x, marker in (
            ("before RL", before, steps[0] if steps else 0, "o"),
            ("after RL", after, steps[-1] if steps else 0, "s"),
        ):
            if ev:
                for key, color in (("eval/greedy_accuracy", "k"), ("eval/sampled_accuracy", "tab:red")):
                    ax.scatter(
                        [x],
                        [ev[key]],
                        marker=marker,
                        color=color,
                        label=f"held-out {key.split('/')[1].split('_')[0]} acc {name}",
                    )
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("reward / accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = self.out_dir / "reward_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        if self.run is not None:
            import wandb

            self.run.log({"reward_curve": wandb.Image(str(path))})
        return path

    def finish(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self.run is not None:
                self.run.finish()
