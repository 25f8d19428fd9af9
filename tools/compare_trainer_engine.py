"""SGLang against the trainer, on the trainer's own engines: the agreement table of issue 10.

``tools/compare_engines.py`` finds the layer where SGLang and `transformers` part; this tool measures what the
GRPO step sees. It builds what ``r1mega-train rollout=sglang`` builds -- a :class:`r1mega.engine.MegatronEngine`
with the ``model.hf_path`` weights, the colocated SGLang engine fed by the trainer's weight push, and the
in-process megatron rollout engine on the same model -- and on the same prompts measures:

* the teacher-forced gap |log pi_SGLang - log pi_trainer| over every token of sampled answers (T = 1): the
  trainer's ``rollout/logp_diff_mean|max`` and NeMo-RL's ``token_mult_prob_error`` (the token mean of
  exp |dlogp|), computed by the trainer's own functions; for MoE with ``rollout.routing_replay=true`` also
  with the experts SGLang chose replayed in the trainer's forward (R3), beside the gap without;
* the same answers rescored by SGLang's prefill (extend) kernels: against the trainer, and against SGLang's own
  decode-time log-probs (how much of the gap the token-by-token decode path adds);
* greedy answers (``--new-tokens``) of SGLang and of the megatron engine: how many are equal;
* the weight push: bytes, seconds, GB/s and the gather / convert / ipc_load / verify split;

then moves every weight (an optimizer-step stand-in), pushes, and measures again. ``--bench-gen`` adds the
generation throughput of r1mega's SGLang engine against a standalone ``sglang.Engine`` started on the same HF
folder with the same server settings, on the same prompts and sampling settings (issue 10's 15 % bound).

    # the GPU machine, SGLang + TE installed (../shared/device/README.md)
    python3 tools/compare_trainer_engine.py --hf-dir $SMOLLM2_HF -- data.template=chat train.fp32_lm_head=true
    python3 tools/compare_trainer_engine.py --family qwen3_moe --tokenizer-from $SMOLLM2_HF -- \\
        data.template=chat train.fp32_lm_head=true rollout.routing_replay=true
    python3 tools/compare_trainer_engine.py --family llama --wide --tokenizer-from $SMOLLM2_HF --prompts 8

Everything after ``--`` is a Hydra override of r1mega's training config. On the CPU, ``--engine megatron``
compares the megatron engine with itself (the tool's plumbing; tests/test_compare_trainer_engine.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose(overrides: list[str]):
    """r1mega-train's typed Config from Hydra overrides (the same schema, checks and defaults)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from r1mega.config import config_from_hydra, register_configs
    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return config_from_hydra(hydra_compose("config", overrides=overrides))


def gsm8k_questions(n: int) -> list[str]:
    """The first ``n`` GSM8K test questions (shipped with r1mega-eval)."""
    from r1mega.config import DataConfig
    from r1mega.eval.config import EvalConfig
    from r1mega.eval.datasets import load_eval_sets

    sets = load_eval_sets(EvalConfig(sets=["gsm8k"], limit=n), DataConfig())
    return [p.question for p in sets["gsm8k"]]


class Setup:
    """The trainer's policy and two rollout engines on its weights: ``cand`` (rollout=<engine>) and megatron."""

    def __init__(self, cfg, engine: str, tokenizer, floor: bool = False) -> None:
        from r1mega.config import MegatronRolloutConfig
        from r1mega.engine import MegatronEngine
        from r1mega.model.hf_load import load_hf_weights
        from r1mega.parallel.runtime import init_runtime
        from r1mega.rollout import build_rollout_engine

        self.cfg, self.tok = cfg, tokenizer
        self.runtime = init_runtime(cfg.parallel, cfg.train.seed, cfg.train.device, cfg.train.threads)
        self.policy = MegatronEngine(cfg, self.runtime, cfg.model.vocab_size or self.tok.vocab_size)
        load_hf_weights(self.policy.model, cfg.model)
        self.policy.optimizer.reload_model_params()
        r = cfg.rollout
        mcfg = replace(
            cfg,
            rollout=MegatronRolloutConfig(
                sampling=r.sampling, max_batch_size=r.max_batch_size, routing_replay=r.routing_replay
            ),
        )
        self.megatron = build_rollout_engine(mcfg, self.policy.weights, self.tok)
        self.cand = self.megatron if engine == "megatron" else build_rollout_engine(cfg, self.policy.weights, self.tok)
        self.exact = None  # --floor: the same weights in fp32, the forward both bf16 sides round away from
        if floor:
            cfg32 = replace(cfg, train=replace(cfg.train, precision="fp32", fp32_lm_head=False, fp8=None))
            self.exact = MegatronEngine(cfg32, self.runtime, cfg.model.vocab_size or self.tok.vocab_size)
            self.sync_exact()

    def sync_exact(self) -> None:
        """The fp32 copy takes the policy's current (bf16) weights exactly: upcasting rounds nothing."""
        if self.exact is not None:
            with torch.no_grad():
                for p32, p in zip(self.exact.model.parameters(), self.policy.model.parameters(), strict=True):
                    p32.copy_(p)

    def close(self) -> None:
        from r1mega.parallel.runtime import shutdown_runtime

        if self.cand is not self.megatron:
            self.cand.shutdown()
        self.megatron.shutdown()
        shutdown_runtime()


def masked_gap(a: torch.Tensor, b: torch.Tensor, known: torch.Tensor) -> tuple[float, float]:
    """Mean and max |a - b| over the ``known`` tokens (on the CPU, in fp32)."""
    d = (a.float().cpu() - b.float().cpu()).abs().nan_to_num(0.0) * known
    return float(d.sum()) / max(float(known.sum()), 1.0), float(d.max())


def logprob_gap(s: Setup, prompts: list[list[int]], seed: int) -> dict[str, float]:
    """Sampled answers (T = 1) of the candidate, scored by the trainer: the step's alignment metrics."""
    from r1mega.rollout.base import SamplingParams
    from r1mega.trainer import (
        alignment_metrics,
        alignment_sums,
        build_token_batch,
        rollout_logprob_gap,
        scatter_response,
    )

    sp = SamplingParams(1.0, 1.0, 0, s.cfg.rollout.sampling.max_new_tokens, seed=seed)
    s.cand.resume_memory()
    t0 = time.perf_counter()
    rollouts = s.cand.generate(prompts, sp)
    gen_s = time.perf_counter() - t0
    s.cand.release_memory()
    batch = build_token_batch(rollouts, s.tok.pad_id, s.policy.seq_multiple)
    out: dict[str, float] = {"gen_tokens": float(sum(len(r.response_ids) for r in rollouts)), "gen_s": gen_s}
    variants = [("", None)]
    if batch.routed_experts is not None:  # R3: the candidate's experts replayed; the gap without them beside
        variants = [("r3_", batch.routed_experts), ("", None)]
    for tag, routes in variants:
        batch.routed_experts = routes
        batch.old_logp, _ = s.policy.compute_logprobs(batch, 1.0)
        diff, known = rollout_logprob_gap(rollouts, batch, True)
        m = alignment_metrics(alignment_sums(diff, known), float(diff.max()) if diff.numel() else 0.0)
        out.update({tag + k.removeprefix("rollout/"): v for k, v in m.items()})  # the trainer's own step metrics
        out["tokens"] = float(known.sum())
    if hasattr(s.cand, "score"):  # SGLang's prefill kernels on the same tokens: the decode path's share of the gap
        s.cand.resume_memory()
        pre = s.cand.score([r.prompt_ids + r.response_ids for r in rollouts], [len(r.prompt_ids) for r in rollouts])
        s.cand.release_memory()
        pre_lp = scatter_response(pre, rollouts, batch.mask)
        known = batch.mask * torch.isfinite(pre_lp) * torch.isfinite(batch.rollout_logp)
        for tag, ref in (("prefill_vs_trainer", batch.old_logp), ("prefill_vs_decode", batch.rollout_logp)):
            out[f"{tag}_mean"], out[f"{tag}_max"] = masked_gap(pre_lp, ref, known)
    if s.exact is not None:  # each side's distance from the fp32 forward: the bf16 floor, and who is off
        exact, _ = s.exact.compute_logprobs(batch, 1.0)
        known = batch.mask * torch.isfinite(batch.rollout_logp)
        for tag, lp in (("engine", batch.rollout_logp), ("trainer", batch.old_logp)):
            out[f"fp32_gap_{tag}_mean"], out[f"fp32_gap_{tag}_max"] = masked_gap(lp, exact, known)
    return out


def greedy_equal(s: Setup, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    from r1mega.rollout.base import SamplingParams

    sp = SamplingParams(0.0, 1.0, 1, new_tokens)
    s.cand.resume_memory()
    a = s.cand.generate(prompts, sp)
    s.cand.release_memory()
    b = s.megatron.generate(prompts, sp)
    same = sum(x.response_ids == y.response_ids for x, y in zip(a, b))
    # the first token where they part, averaged over the prompts that part (how early greedy diverges)
    firsts = [next((i for i, (u, v) in enumerate(zip(x.response_ids, y.response_ids)) if u != v), None)
              for x, y in zip(a, b)]  # fmt: skip
    parted = [f for f in firsts if f is not None]
    return {"greedy_equal": same, "greedy_prompts": len(prompts),
            "greedy_first_diff_mean": sum(parted) / len(parted) if parted else math.nan}  # fmt: skip


def perturb(policy, scale: float = 0.01, seed: int = 7) -> None:
    """An optimizer-step stand-in: every weight moves by ``scale`` of its own spread (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.dim() >= 2:
                noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=torch.float32)
                p.add_((noise * scale * p.float().std()).to(p.dtype))


def push(s: Setup) -> dict[str, float]:
    s.cand.update_weights(s.policy.weights)
    return dict(getattr(s.cand, "last_push_metrics", {}) or {})


def bench_generation(
    s: Setup, hf_dir: Path, prompts: list[list[int]], group: int, new_tokens: int, seed: int
) -> dict[str, float]:
    """Tokens/s of r1mega's SGLang engine vs a standalone ``sglang.Engine`` with the same server settings on the
    same HF folder (its own loader, no memory saver), same prompts x G and sampling settings. Ours first (it is
    then shut down to free the GPU); each side gets one untimed warm-up call."""
    from r1mega.rollout.base import SamplingParams
    from r1mega.rollout.sglang_io import request_seed, sampling_dict
    from r1mega.rollout.sglang_server import shutdown_engine, start_engine

    reqs = [p for p in prompts for _ in range(group)]
    sp = SamplingParams(1.0, 1.0, 0, new_tokens, seed=seed)
    s.cand.resume_memory()
    s.cand.generate(reqs[: len(prompts)], sp)
    t0 = time.perf_counter()
    ours = s.cand.generate(reqs, sp)
    ours_s = time.perf_counter() - t0
    ours_tok = sum(len(r.response_ids) for r in ours)
    kw = dict(s.cand.engine_args)  # the server settings our engine was started with
    s.cand.shutdown()
    torch.cuda.empty_cache()
    for k in ("load_format", "enable_memory_saver", "model_path"):
        kw.pop(k, None)
    kw["port"] = kw.get("port", 30000) + 50  # ours may still hold its ports for a moment
    eng = start_engine(model_path=str(hf_dir), **kw)
    try:
        eos = int(s.tok.eos_id)
        params = [sampling_dict(sp, eos, request_seed(seed, 0, i)) for i in range(len(reqs))]
        eng.generate(input_ids=reqs[: len(prompts)], sampling_params=params[: len(prompts)], return_logprob=True)
        t0 = time.perf_counter()
        res = eng.generate(input_ids=reqs, sampling_params=params, return_logprob=True)
        base_s = time.perf_counter() - t0
    finally:
        shutdown_engine(eng)
    base_tok = sum(len(r["output_ids"]) for r in res)
    return {"requests": len(reqs), "ours_tokens": ours_tok, "ours_s": ours_s, "ours_tok_s": ours_tok / ours_s,
            "standalone_tokens": base_tok, "standalone_s": base_s, "standalone_tok_s": base_tok / base_s,
            "ratio": (ours_tok / ours_s) / (base_tok / base_s)}  # fmt: skip


def build_config(args, hf_dir: Path):
    from r1mega.config import validate
    from r1mega.model.hf_load import resolve_model_config

    cuda = torch.cuda.is_available()
    base = [f"model.hf_path={hf_dir}", f"rollout={args.engine}", "algo.beta=0", "logging.wandb_mode=disabled",
            f"rollout.sampling.max_new_tokens={args.new_tokens}", f"train.device={'cuda' if cuda else 'cpu'}",
            f"train.precision={'bf16' if cuda else 'fp32'}"]  # fmt: skip
    cfg = compose(base + args.overrides)
    cfg.model = resolve_model_config(cfg.model)
    validate(cfg, world_size=1)
    return cfg


def run(args) -> dict:
    from r1mega.data.tasks import encode_prompt
    from r1mega.data.tokenizer import build_tokenizer

    hf_dir = args.hf_dir
    if hf_dir is None:
        from compare_engines import make_tiny_hf

        hf_dir = make_tiny_hf(args.family, Path(tempfile.mkdtemp(prefix="r1mega_cte_")) / args.family,
                              tokenizer_from=args.tokenizer_from, wide=args.wide)  # fmt: skip
    cfg = build_config(args, hf_dir)
    tok = build_tokenizer(cfg.model.tokenizer)
    prompts = [encode_prompt(tok, q, cfg.data.template) for q in gsm8k_questions(args.prompts)]
    cfg.data.max_prompt_len = max(map(len, prompts))  # the megatron engine's context: prompt + new tokens
    s = Setup(cfg, args.engine, tok, floor=args.floor)
    summary: dict = {"model": str(args.hf_dir or args.family), "engine": args.engine,
                     "fp32_lm_head": cfg.train.fp32_lm_head, "routing_replay": cfg.rollout.routing_replay}  # fmt: skip
    try:
        nbytes = sum(p.numel() * p.element_size() for p in s.policy.model.parameters())
        summary["param_gb"] = nbytes / 1e9
        log(f"{len(prompts)} prompts (longest {cfg.data.max_prompt_len} tokens), model {nbytes / 1e9:.2f} GB")
        summary["push_first"] = push(s)
        for tag in ("same_weights", "after_push"):
            if tag == "after_push":
                perturb(s.policy)
                s.sync_exact()
                summary["push"] = push(s)
                log(f"push: {json.dumps(summary['push'])}")
            res = logprob_gap(s, prompts, seed=cfg.train.seed)
            res.update(greedy_equal(s, prompts, args.new_tokens))
            summary[tag] = res
            log(f"[{tag}] {json.dumps(res)}")
        if args.bench_gen:
            summary["bench_gen"] = bench_generation(s, hf_dir, prompts, args.group, args.gen_tokens, cfg.train.seed)
            log(f"[bench_gen] {json.dumps(summary['bench_gen'])}")
    finally:
        s.close()
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


def print_table(summary: dict) -> None:
    print(f"\n{summary['model']}: {summary['engine']} vs megatron (fp32 LM head {summary['fp32_lm_head']}, "
          f"R3 {summary['routing_replay']}, {summary.get('param_gb', 0):.2f} GB)")  # fmt: skip
    print(f"{'weights':<14}{'mean|dlogp|':>12}{'max|dlogp|':>11}{'mult_err':>10}{'R3 mean':>10}{'greedy eq':>11}")
    for tag in ("same_weights", "after_push"):
        r = summary.get(tag)
        if r:
            r3 = f"{r['r3_logp_diff_mean']:.4f}" if "r3_logp_diff_mean" in r else "-"
            if "prefill_vs_trainer_mean" in r:
                pt, pd = r["prefill_vs_trainer_mean"], r["prefill_vs_decode_mean"]
                print(f"  [{tag}] the engine's prefill log-probs of the same tokens: vs trainer {pt:.4f}, "
                      f"vs its own decode {pd:.4f}")  # fmt: skip
            if "fp32_gap_engine_mean" in r:
                print(f"  [{tag}] from the fp32 forward: engine {r['fp32_gap_engine_mean']:.4f}, "
                      f"trainer {r['fp32_gap_trainer_mean']:.4f} (mean |dlogp|)")  # fmt: skip
            print(f"{tag:<14}{r['logp_diff_mean']:>12.4f}{r['logp_diff_max']:>11.3f}{r['token_mult_prob_error']:>10.4f}"
                  f"{r3:>10}{r['greedy_equal']:>6}/{r['greedy_prompts']}")  # fmt: skip
    p = summary.get("push")
    if p:
        print("push: " + ", ".join(f"{k}={v:.4g}" for k, v in p.items()))


def main() -> None:  # pragma: no cover - argument parsing; run() is tested
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", type=Path)
    ap.add_argument("--family", choices=("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"))
    ap.add_argument("--tokenizer-from", type=Path, help="HF folder whose tokenizer a --family model gets")
    ap.add_argument("--wide", action="store_true", help="--family llama at ~2.1 GB (the push-throughput row)")
    ap.add_argument("--engine", default="sglang", help="the candidate rollout engine (rollout=<engine>)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bench-gen", action="store_true", help="tokens/s vs a standalone sglang.Engine")
    ap.add_argument("--group", type=int, default=8, help="--bench-gen: samples per prompt")
    ap.add_argument("--gen-tokens", type=int, default=256, help="--bench-gen: max new tokens (the GRPO run's)")
    ap.add_argument("--floor", action="store_true", help="also each side's gap from the fp32 forward")
    ap.add_argument("--json", type=Path)
    ap.add_argument("overrides", nargs="*", help="r1mega Hydra overrides (after --)")
    args = ap.parse_args()
    if not (args.hf_dir or args.family):
        ap.error("give --hf-dir or --family")
    run(args)


if __name__ == "__main__":
    main()
