"""Evaluation during training (before / after RL and every ``train.eval_every`` steps) through the one evaluator,
:func:`r1mega.eval.runner.evaluate`, on the trainer's own engine, tokenizer and reward workers.

The sets: the training config's held-out problems as ``heldout``, plus every other entry of ``eval.sets`` (shipped
sets or .jsonl files, each cut to ``eval.limit``). ``eval.sets`` defaults to ``[heldout]`` for training;
``r1mega-eval``'s eval.yaml names the five shipped sets. A named set the tokenizer cannot encode, or whose
longest prompt plus the answer budget exceeds the rollout engine's context, stops the run at build time with
the fix (:func:`check_training_sets`), not at the first evaluation.

Two passes, as the trainer has always reported them: one greedy answer per problem, and ``train.eval_samples``
answers at the *rollout's* sampling (``rollout.sampling``, seed ``data.seed``): the training-time pass@1 estimate,
not R1's T=0.6 protocol (that is ``r1mega-eval``). The keys (:func:`training_metrics`): ``eval/greedy_accuracy``,
``eval/greedy_format``, ``eval/sampled_accuracy``, ``eval/sampled_format`` for the held-out set (what
``Tracker.plot_rewards`` and the run summary read), with ``eval/sampled_accuracy_se``, ``eval/pass@k'`` and
``eval/cons@k`` when k > 1; the same names under ``eval/<set>/`` for every other set.
"""

from __future__ import annotations

import dataclasses

from r1mega.config import ConfigError
from r1mega.data.tasks import Problem
from r1mega.eval.datasets import HELDOUT, load_eval_sets
from r1mega.eval.results import EvalResults
from r1mega.eval.runner import EvalSettings
from r1mega.eval.templates import encode_prompts


def training_settings(cfg, samples: int, greedy: bool) -> EvalSettings:
    """``eval.*`` (template, max_new_tokens, chunking) with the rollout's sampling and ``samples`` answers."""
    s = cfg.rollout.sampling
    return dataclasses.replace(
        EvalSettings.from_config(cfg),
        k=samples,
        greedy=greedy,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=cfg.data.seed,
        pass_at=(),
        save_responses=False,
        progress=False,
    )


def training_sets(cfg, heldout: list[Problem]) -> dict[str, list[Problem]]:
    """``{"heldout": heldout, <the other eval.sets>: problems}`` in ``eval.sets`` order (heldout first if absent)."""
    others = [e for e in cfg.eval.sets if e != HELDOUT]
    sets = {HELDOUT: heldout}
    if others:
        sets.update(load_eval_sets(dataclasses.replace(cfg.eval, sets=others), cfg.data))
    return sets


def check_training_sets(cfg, tokenizer, heldout: list[Problem], context: int | None) -> None:
    """Stop before training when a named set cannot be evaluated: the tokenizer does not cover it, or its longest
    prompt + the answer budget exceeds the rollout engine's ``context`` (None: the engine sizes itself)."""
    settings = training_settings(cfg, cfg.train.eval_samples, greedy=True)
    for name, problems in training_sets(cfg, heldout).items():
        if name == HELDOUT:
            continue  # the training prompts: sized by data.max_prompt_len already
        try:
            longest = max(map(len, encode_prompts([p.question for p in problems], settings.template, tokenizer)))
        except ValueError as e:
            raise ConfigError(
                f"eval.sets: {name!r} cannot be evaluated during training: {e}; drop it from eval.sets or use a "
                "tokenizer that covers it (model.tokenizer / model.hf_path)"
            ) from e
        if context is not None and longest + settings.max_new_tokens > context:
            raise ConfigError(
                f"eval.sets: {name!r}: its longest prompt ({longest} tokens) + {settings.max_new_tokens} new tokens "
                f"exceeds the rollout engine's context ({context}); raise rollout.max_seq_len, lower eval.limit / "
                "eval.max_new_tokens, or drop the set"
            )


def training_metrics(greedy: EvalResults, sampled: EvalResults) -> dict[str, float]:
    """The trainer's eval keys from the two passes (see the module docstring)."""
    out: dict[str, float] = {}
    for name, g in greedy.sets.items():
        s = sampled.sets[name].metrics
        prefix = "eval/" if name == HELDOUT else f"eval/{name}/"
        row = {
            "greedy_accuracy": g.metrics["pass@1"],
            "greedy_format": g.metrics["format_rate"],
            "sampled_accuracy": s["pass@1"],
            "sampled_format": s["format_rate"],
        }
        n = int(s["samples_per_problem"])
        if n > 1:
            row["sampled_accuracy_se"] = s["pass@1_se"]
            row.update({k: v for k, v in s.items() if k.startswith("pass@") and k[5:].isdigit() and k != "pass@1"})
            row[f"cons@{n}"] = s[f"cons@{n}"]
        out.update({prefix + k: v for k, v in row.items()})
    out["eval/wall_s"] = greedy.wall_s + sampled.wall_s
    return out
