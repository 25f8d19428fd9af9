"""Run tracking: wandb (offline by default), a JSONL history, and the reward-curve plot.

With a ``run_id`` (:mod:`r1mega.run_identity`) every metrics row carries it, and wandb continues the run of that
id (``resume="allow"``): a resumed or requeued job logs into the same wandb run and the same metrics.jsonl.
:meth:`Tracker.resume_from` drops the rows of steps the checkpoint does not contain, and a row whose step was
already logged (same step, same kind: train or eval) is skipped, so the file holds every step once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Tracker:
    """Logs on the main rank only; other ranks get a no-op tracker."""

    def __init__(
        self,
        out_dir: str,
        mode: str,
        project: str,
        run_name: str | None,
        config: dict[str, Any],
        enabled: bool = True,
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.history: list[dict[str, float]] = []
        self._logged: set[tuple[int, str]] = set()  # (step, kind) rows in metrics.jsonl
        self.run = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.out_dir / "metrics.jsonl"
        self._jsonl = self._path.open("a")
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            ids = {"id": run_id, "resume": "allow"} if run_id else {}
            self.run = wandb.init(
                project=project, name=run_name, mode=mode, dir=str(self.out_dir), config=config, **ids
            )

    @staticmethod
    def _kind(row: dict) -> str:
        """A row's kind, one row per (step, kind): "train", or its evaluation's namespace ("eval", "eval_greedy")."""
        spaces = {k.split("/", 1)[0] for k in row if k.startswith("eval") and "/" in k}
        return min(spaces) if spaces else "train"

    def resume_from(self, steps_done: int) -> None:
        """Continue metrics.jsonl for a run whose checkpoint holds ``steps_done`` steps (call before logging).

        Rows of later steps (logged by an attempt that died after that checkpoint) are dropped: they are about to
        be computed again. ``steps_done=0`` is a fresh start: an earlier file is moved aside, not mixed in.
        """
        if not self.enabled or not self._path.is_file() or self._path.stat().st_size == 0:
            return
        self._jsonl.close()
        if steps_done == 0:
            aside = self._path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(self._path, aside)
            self.history, self._logged = [], set()
        else:
            rows = [json.loads(x) for x in self._path.read_text().splitlines() if x.strip()]
            kept = [r for r in rows if r["step"] <= steps_done]
            if len(kept) != len(rows):
                tmp = self._path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self._path)
            self.history = kept
            self._logged = {(r["step"], self._kind(r)) for r in kept}
        self._jsonl = self._path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **({"run_id": self.run_id} if self.run_id else {}), **metrics}
        key = (step, self._kind(row))
        if key in self._logged:
            return  # this step was logged by an earlier attempt of the run
        self._logged.add(key)
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._wandb(lambda run: run.log(metrics, step=step))

    def summary(self, values: dict[str, float]) -> None:
        self._wandb(lambda run: run.summary.update(values))

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

            self._wandb(lambda run: run.log({"reward_curve": wandb.Image(str(path))}))
        return path

    def _wandb(self, call: Callable[[Any], Any]) -> None:
        """``call(run)`` when wandb is on. wandb's service is a separate process, and Slurm signals every process
        of a job (``scontrol requeue``, ``scancel``, preemption): it can be gone while the trainer still finishes
        its step and checkpoint. Then wandb is dropped for the rest of this attempt with one warning (metrics.jsonl
        keeps every row; the next attempt continues the same wandb run id) instead of crashing the save."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as e:  # ConnectionResetError / BrokenPipeError from the service socket, wandb's own errors
            logger.warning(
                "wandb stopped (%s: %s); metrics.jsonl goes on, the next attempt resumes the run", type(e).__name__, e
            )
            self.run = None
            with contextlib.suppress(Exception):  # unregisters wandb's atexit hook, which would fail the same way
                import wandb

                wandb.teardown()

    def finish(self) -> None:
        """Close metrics.jsonl and the wandb run, and stop wandb's service now: SGLang's shutdown kills every child
        process of ours (``kill_process_tree``), and wandb's atexit teardown would then fail on the dead service."""
        if self.enabled:
            self._jsonl.close()
            self._wandb(lambda run: run.finish())
            if self.run is not None:
                import wandb

                with contextlib.suppress(Exception):
                    wandb.teardown()
                self.run = None
