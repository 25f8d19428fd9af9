"""``r1mega-eval``: evaluate a checkpoint the way R1 reports it (Hydra; the training config and overrides).

    r1mega-eval model.checkpoint=runs/x/ckpt/step_000149 eval.sets=[heldout]          # the tiny default
    r1mega-eval model=... model.tokenizer=<hf dir> model.checkpoint=... eval.sets=[gsm8k,math500] eval.k=16 \\
        eval.template=chat eval.max_new_tokens=4096 rollout=sglang train.precision=bf16
    r1mega-eval ... eval.greedy=true eval.limit=50
    r1mega-eval model.hf_path=<HF folder> eval.sets=[gsm8k] eval.template=chat eval.greedy=true   # any HF model

``model.hf_path`` gives the architecture (config.json), the weights and, unless ``model.tokenizer`` is set, the
tokenizer with its chat template and end-of-turn token (the engines stop on ``tokenizer.eos_id``).

r1mega/conf/eval.yaml is the primary config: r1mega/conf/config.yaml (the training defaults) + R1's protocol (eval.*).
Prints the table, writes ``eval.output`` (default ``<logging.out_dir>/eval.json``) with every per-problem result
(and, chunk by chunk while it runs, the running per-set numbers to ``eval_progress.json`` beside it),
and logs the summary through :class:`r1mega.tracking.Tracker` (wandb + metrics.jsonl). A stopped run, started
again with the same command, generates only the chunks it had not finished (``eval.resume``, r1mega/eval/chunks.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from r1mega.train import CONF_DIR, _quiet


def _with_suffix(path: str, suffix: str) -> str:
    """``runs/eval.json`` -> ``runs/eval<suffix>.json``."""
    p = Path(path)
    return str(p.with_name(p.stem + suffix + ".json"))


def build_policy_and_engine(cfg, runtime, tokenizer, first):
    """The model under evaluation, holding ``first``'s weights (an :class:`r1mega.eval.sources.EvalModel`), and a
    rollout engine on it: the ONE place both are built.

    As ``r1mega-train`` builds them (:class:`r1mega.engine.MegatronEngine`, the weights of a megatron checkpoint
    or an HF folder; :func:`r1mega.rollout.build_rollout_engine`). No reference model is built (nothing is
    trained); the engine also allocates its optimizer, which megatron builds together with the DDP wrapper.
    """
    from r1mega.engine import MegatronEngine
    from r1mega.eval.sources import load_weights
    from r1mega.rollout import build_rollout_engine

    cfg.algo.beta = 0.0  # no reference model
    policy = MegatronEngine(cfg, runtime, cfg.model.vocab_size or tokenizer.vocab_size)
    load_weights(policy, cfg, first)
    return policy, build_rollout_engine(cfg, policy.weights, tokenizer)


def _check_checkpoints(policy, models) -> None:
    """Every megatron-checkpoint entry fits the built model (tensor names and shapes; metadata only), before the
    first evaluation rather than after it."""
    from r1mega.checkpoint import check_compatible

    for m in models:
        if not m.is_hf:
            check_compatible(policy.model, Path(m.path) / "model" if (Path(m.path) / "model").is_dir() else m.path)


def run(cfg):
    """Evaluate with the typed ``Config``; returns the :class:`r1mega.eval.results.EvalResults` (the sampled
    ones when ``eval.also_greedy`` adds a greedy pass)."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from r1mega.config import ConfigError, validate
    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.eval.datasets import load_eval_sets
    from r1mega.eval.runner import EvalSettings
    from r1mega.eval.sources import architecture_config, eval_models, load_weights
    from r1mega.eval.templates import encode_prompts
    from r1mega.parallel.runtime import dist_env_from_environ, init_runtime, shutdown_runtime
    from r1mega.rewards import RewardScorer
    from r1mega.tracking import Tracker

    out = cfg.eval.output or str(Path(cfg.logging.out_dir) / "eval.json")
    models = eval_models(cfg.model, list(cfg.eval.models), out)  # nothing to evaluate: stop before any load
    cfg.model = architecture_config(cfg.model, models)  # model.hf_path: architecture + tokenizer from the folder
    validate(cfg, world_size=dist_env_from_environ().world_size)
    settings = EvalSettings.from_config(cfg)
    tokenizer = build_tokenizer(cfg.model.tokenizer)
    sets = load_eval_sets(cfg.eval, cfg.data)  # a bad file or row stops here, before any model is built
    longest = 0
    for name, problems in sets.items():
        try:
            prompts = encode_prompts([p.question for p in problems], settings.template, tokenizer)
        except ValueError as e:
            raise ConfigError(f"eval.sets: {name}: {e}; use a tokenizer that covers the set (model.tokenizer)") from e
        longest = max(longest, *map(len, prompts))
    if longest + settings.max_new_tokens > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"the longest prompt ({longest} tokens) + eval.max_new_tokens={settings.max_new_tokens} exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}; lower eval.max_new_tokens"
        )
    cfg.data.max_prompt_len = longest  # the megatron engine's context = these two (rollout.max_seq_len unset)
    cfg.rollout.sampling.max_new_tokens = settings.max_new_tokens
    runtime = init_runtime(cfg.parallel, cfg.train.seed, cfg.train.device, cfg.train.threads)
    console = Console(stderr=True, quiet=not runtime.is_main)
    n = sum(len(p) for p in sets.values())
    console.print(
        f"[bold]r1mega-eval[/] {cfg.model.name} from {', '.join(m.path for m in models)}: {n} problems in "
        f"{', '.join(f'{k} ({len(v)})' for k, v in sets.items())}, {settings.samples} sample(s) each"
    )
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    tracker = Tracker(
        cfg.logging.out_dir,
        cfg.logging.wandb_mode,
        cfg.logging.project,
        cfg.logging.run_name,
        container,
        enabled=runtime.is_main,
    )
    t_build = time.perf_counter()
    policy, engine = build_policy_and_engine(cfg, runtime, tokenizer, models[0])
    console.print(f"model + {cfg.rollout.backend} engine ready in {time.perf_counter() - t_build:.1f} s")
    try:
        _check_checkpoints(policy, models[1:])
        with RewardScorer(cfg.reward) as scorer:
            for i, model in enumerate(models):
                if i:  # the next model's weights into the same policy and engine: no second start-up
                    t_load = time.perf_counter()
                    load_weights(policy, cfg, model)
                    engine.update_weights(policy.weights)
                    console.print(f"{model.label}: weights loaded and pushed in {time.perf_counter() - t_load:.1f} s")
                meta = {"model": cfg.model.name, "label": model.label, "tokenizer": cfg.model.tokenizer}
                meta.update(checkpoint=None if model.is_hf else model.path, eos_id=tokenizer.eos_id)
                meta.update(hf_path=model.path if model.is_hf else cfg.model.hf_path)
                meta.update(engine=cfg.rollout.backend, config=container)
                results = _evaluate_one(cfg, runtime, engine, tokenizer, scorer, sets, settings, meta, model, tracker,
                                        console, step=i)  # fmt: skip
    finally:
        tracker.finish()
        engine.shutdown()
        shutdown_runtime()
    return results


def _evaluate_one(cfg, runtime, engine, tokenizer, scorer, sets, settings, meta, model, tracker, console, step):
    """One model: the greedy pass first when ``eval.also_greedy`` (the fast one: a stopped run still has a score),
    then the configured one; each reported (table, JSON, tracker under ``eval[_greedy][/<label>]``) as it ends."""
    from r1mega.eval.report import report
    from r1mega.eval.runner import evaluate, remove_chunks

    label = f"/{model.label}" if model.label else ""
    runs = [(settings, model.output, "eval" + label)]
    if cfg.eval.also_greedy and not settings.greedy:
        runs.insert(0, (replace(settings, greedy=True), _with_suffix(model.output, "_greedy"), "eval_greedy" + label))
    for how, path, prefix in runs:
        if model.label:
            console.print(f"[bold]{model.label}[/] ({model.path}): {'greedy' if how.greedy else f'k={how.k}'}")
        progress = _with_suffix(path, "_progress")  # running numbers, chunk by chunk
        results = evaluate(engine, tokenizer, scorer, sets, how, meta, progress_path=progress, chunks_path=path,
                           resume=cfg.eval.resume)  # fmt: skip
        if runtime.is_main:
            report(results, path, tracker, step=step, console=console, prefix=prefix)
        if runtime.env.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # the results JSON is written: the finished chunks may go
        remove_chunks(path)
    return results


def main() -> None:
    _quiet()
    import hydra

    from r1mega.config import ConfigError, config_from_hydra, register_configs
    from r1mega.eval.datasets import DatasetError

    register_configs()

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="eval")
    def _hydra_main(dcfg) -> None:
        try:
            run(config_from_hydra(dcfg))
        except (ConfigError, DatasetError) as e:
            print(f"{'config' if isinstance(e, ConfigError) else 'data'} error: {e}", file=sys.stderr)
            sys.exit(2)

    _hydra_main()


if __name__ == "__main__":
    main()
