"""Training-step throughput on one GPU (issue 13): packed vs padded GRPO steps at real MoE layer shapes, the
log-prob pass at T = 32k, V = 152k (eager vs logprob_entropy kernel vs fused linear + log-prob), and the training
pass's LM head + loss with its backward (eager vs the GRPO loss kernel vs train.fused_lm_head_train).

    python tools/bench_train_step.py                 # the H200 run: both models, bf16 + FP8 blockwise, both layouts
    python tools/bench_train_step.py --dry-run       # tiny model on the CPU in seconds (tests/test_bench_train_step.py)

Models (reduced depth, real layer shapes): ``qwen3`` = Qwen3-30B-A3B layers (hidden 2048, 32 q / 4 kv heads of
128, q/k norm, 128 experts top-8 of FFN 768, vocab 151936); ``dsv3`` = DeepSeek-V3 layers (hidden 7168, MLA with
128 heads, q_lora 1536, kv_lora 512, qk 128 + rope 64, v 128; experts of FFN 2048 top-8 plus a 2048 shared
expert, sigmoid router with expert bias, vocab 129280) with 32 routed experts instead of 256 (what one GPU of
an EP=8 layout holds). Each step is one optimizer step (``MegatronEngine.forward_backward``, the GRPO objective
on its kernel path) over ``--tokens`` real tokens of ragged RL rows (lengths long-tailed: lognormal, mean ~2k,
clipped to [64, 16k]); ``padded`` = today's row microbatches padded to the batch's longest row, ``packed`` =
THD microbatches of ``--budget`` tokens (train.max_tokens_per_microbatch).

MFU (real tokens only; padding is waste, not work):
    FLOPs/step = 6 * N_active * T_real + sum_layers sum_seqs 3 * L_i^2 * n_heads * (d_qk + d_v)
    N_active   = non-embedding parameters, routed experts counted at top_k / num_experts (LM head included)
    attention  = fwd + bwd (x3) of QK^T and PV (2 FLOPs per MAC), causal (half of L^2)
    MFU        = FLOPs/step / step time / peak, reported against 989 TFLOP/s (H200 dense bf16 spec) and the
                 ~790 TFLOP/s bf16 matmul ceiling measured on our H200 (docs/perf/kernels.md).
Time split: one profiled step (torch.profiler, tools/step_profile.py): CUDA kernel time bucketed by the op that
launched it (attention / experts / dispatch / loss / LM head / optimizer / other GEMMs / rest), the fraction of
the step's wall time the GPU was busy, and the host side (launches, syncs, top self-CPU ops); --verbose adds
each bucket's top kernels. The old-policy log-prob pass is timed warm, with the kernels (or the fused head) and
with algo.loss_impl=torch (the eager path over [T, V] fp32 logits), with its peak extra memory.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "kernels"), str(_ROOT / "tools")]
os.environ.setdefault("TQDM_DISABLE", "1")

import step_profile  # noqa: E402  (tools/, beside this script)
import torch  # noqa: E402

PEAKS = {"989 spec": 989e12, "790 measured": 790e12}


def model_config(name: str, layers: int, dry: bool):
    from r1mega.config import ModelConfig

    m = ModelConfig(num_layers=layers, vocab_size=0)
    if dry:  # the tiny CPU model (tests/parallel_worker.py's shapes)
        m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.max_position_embeddings = 64, 4, 128, 256
        m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size, m.moe_router_topk = 4, 32, 32, 2
        return m, 512
    m.max_position_embeddings = 32768
    if name == "qwen3":
        m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels = 2048, 32, 4, 128
        m.qk_layernorm, m.rotary_base, m.ffn_hidden_size = True, 1e6, 6144
        m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size = 128, 8, 768
        m.moe_shared_expert_intermediate_size, m.moe_router_score_function = None, "softmax"
        m.moe_router_enable_expert_bias, m.moe_router_dtype = False, "fp32"
        return m, 151936
    m.hidden_size, m.num_attention_heads, m.ffn_hidden_size = 7168, 128, 18432
    m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank = True, 1536, 512
    m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim, m.qk_layernorm = 128, 64, 128, True
    m.position_embedding_type = "none"
    m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size = 32, 8, 2048, 2048
    m.moe_router_score_function, m.moe_router_enable_expert_bias, m.moe_router_dtype = "sigmoid", True, "fp32"
    m.moe_router_topk_scaling_factor = 2.5
    return m, 129280


def ragged_lengths(total: int, mean: float, cap: int, seed: int = 0) -> list[int]:
    """Row lengths (prompt + response) until ``total`` tokens: lognormal (sigma 1, long right tail), mean ~``mean``."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    out: list[int] = []
    while sum(out) < total:
        n = float(torch.empty(1).log_normal_(mu, sigma, generator=g))
        out.append(int(min(max(n, 64 if cap >= 1024 else 8), cap)))
    return out


def make_batch(lengths: list[int], vocab: int, prompt: int, multiple: int):
    from r1mega.batch import TokenBatch

    g = torch.Generator().manual_seed(1)
    s = -(-max(lengths) // multiple) * multiple
    tokens = torch.randint(0, vocab, (len(lengths), s), generator=g)
    mask = torch.zeros(len(lengths), s - 1)
    for i, n in enumerate(lengths):
        p = min(prompt, n // 2)
        mask[i, p - 1 : n - 1] = 1.0
    adv = torch.randn(len(lengths), 1, generator=g) * mask
    return TokenBatch(tokens=tokens, mask=mask, advantages=adv)


def active_params(gpt, topk: int, experts: int) -> float:
    n = 0.0
    for name, p in gpt.named_parameters():
        if "embedding" in name:
            continue
        n += p.numel() * (topk / experts if ".mlp.experts." in name else 1.0)
    return n


def step_flops(m, n_active: float, lengths: list[int]) -> float:
    heads = m.num_attention_heads
    if m.multi_latent_attention:
        d = (m.qk_head_dim + m.qk_pos_emb_head_dim) + m.v_head_dim
    else:
        d = 2 * (m.kv_channels or m.hidden_size // heads)
    attn = m.num_layers * sum(3.0 * n * n * heads * d for n in lengths)
    return 6.0 * n_active * sum(lengths) + attn


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_step(args, rt, name: str, precision: str, mode: str, fusions: bool = True) -> None:
    from r1mega.config import Config
    from r1mega.engine import MegatronEngine
    from r1mega.objectives.grpo import GRPOObjective

    cfg = Config()
    cfg.model, vocab = model_config(name, args.layers, args.dry_run)
    cfg.train.precision = "bf16" if precision != "fp32" else "fp32"
    cfg.train.fp8 = "blockwise" if precision == "fp8" else None
    cfg.train.micro_batch_size = max(1, args.budget // args.max_len)
    cfg.train.max_tokens_per_microbatch = args.budget if mode.startswith("packed") else 0
    cfg.train.fused_lm_head = cfg.train.fused_lm_head_train = mode.endswith("_fused")  # no [T, V] logits anywhere
    cfg.train.te_fusions = fusions
    cfg.algo.beta = 0.0  # no reference model: one model's memory
    cfg.optim.lr = 1e-6
    dev = rt.device
    engine = MegatronEngine(cfg, rt, vocab)
    objective = GRPOObjective.from_config(cfg, dev)
    lengths = ragged_lengths(args.tokens, args.mean_len, args.max_len)
    batch = make_batch(lengths, vocab, args.prompt_len, engine.seq_multiple)
    n_active = active_params(engine.model, cfg.model.moe_router_topk, cfg.model.num_experts)
    flops = step_flops(cfg.model, n_active, lengths)
    batch.old_logp, _ = engine.compute_logprobs(batch, 1.0)  # warm-up: kernels compile, TE picks its backends
    engine.forward_backward(batch, objective, cfg.optim.lr)  # warm-up
    passes = {}
    for impl in ("auto", "torch"):  # the kernels (or the fused head), then today's eager path
        cfg.algo.loss_impl = impl
        _, t_pass, extra = timed(partial(engine.compute_logprobs, batch, 1.0), dev, 1, warmup=False)
        passes[impl] = f"{t_pass * 1e3:.0f} ms (+{extra:.1f} GiB)"
    cfg.algo.loss_impl = "auto"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.forward_backward(batch, objective, cfg.optim.lr)
    sync(dev)
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    mfu = "  ".join(f"MFU({k})={flops / dt / v:.3f}" for k, v in PEAKS.items())
    print(
        f"{name:6s} {precision:5s} {mode:6s} rows={len(lengths)} real_tokens={sum(lengths)} "
        f"padded_tokens={batch.tokens.numel()} step={dt * 1e3:.1f} ms tokens/s={sum(lengths) / dt:,.0f} "
        f"TFLOP/s={flops / dt / 1e12:.1f} {mfu} peak_mem={peak:.1f} GiB logprob_pass={passes['auto']} "
        f"eager_logprob_pass={passes['torch']} N_active={n_active / 1e6:.1f}M fusions={'on' if fusions else 'off'}"
    )
    if args.profile and (mode != "padded" or args.dry_run):  # padded: ~75k kernel events, a minute to analyse
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            engine.forward_backward(batch, objective, cfg.optim.lr)
            sync(dev)
            wall = time.perf_counter() - t0
        print(step_profile.report(step_profile.analyse(prof, wall), args.verbose))


def timed(fn, dev, steps: int, warmup: bool = True):
    """(fn's last result, seconds per call, peak extra GiB on the GPU) after one untimed warm-up call."""
    if warmup:  # compile / autotune
        fn()
    sync(dev)
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else float("nan")
    return out, dt, extra


def bench_logprob_pass(args, dev) -> None:
    """T real tokens, vocab V, hidden H: the old-policy / reference pass from the final hidden states."""
    from r1mega.grpo.logprobs import kernel_token_logprobs, kernels_available, token_logprobs

    t, v, h = (256, 512, 64) if args.dry_run else (32768, 151936, 2048)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(1, t, h, device=dev, dtype=dtype, generator=g)
    weight = torch.randn(v, h, device=dev, dtype=dtype, generator=g) / math.sqrt(h)
    targets = torch.randint(0, v, (1, t), device=dev, generator=g)
    paths = {"eager": lambda: token_logprobs(hidden @ weight.t(), targets, 1.0, with_entropy=True)}
    if kernels_available():
        from r1mega.grpo.logprobs import fused_token_logprobs

        paths["kernel"] = lambda: kernel_token_logprobs(hidden @ weight.t(), targets, 1.0)
        paths["fused"] = lambda: fused_token_logprobs(hidden, weight, targets, 1.0)
    ref = None
    for name, fn in paths.items():
        (logp, _), dt, extra = timed(fn, dev, args.steps)
        err = "" if ref is None else f" max|dlogp|={float((logp - ref).abs().max()):.2e}"
        ref = logp if ref is None else ref
        print(f"logprob T={t} V={v} H={h} {name:6s} {dt * 1e3:8.2f} ms (incl. the LM-head matmul) "
              f"peak_extra={extra:.2f} GiB{err}")  # fmt: skip
    # the log-prob step alone, from given logits (what the engine's unfused pass does after the LM head), and
    # the LM-head matmul alone: the floor of every path above (2*T*H*V FLOPs)
    logits = hidden @ weight.t()
    alone = {"matmul": lambda: (hidden @ weight.t(), None)}
    alone["eager"] = lambda: token_logprobs(logits, targets, 1.0, with_entropy=True)
    if kernels_available():
        alone["kernel"] = lambda: kernel_token_logprobs(logits, targets, 1.0)
    for name, fn in alone.items():
        _, dt, extra = timed(fn, dev, args.steps)
        tf = f" = {2 * t * h * v / dt / 1e12:.0f} TFLOP/s" if name == "matmul" else ""
        print(f"logprob-from-logits T={t} V={v} {name:6s} {dt * 1e3:8.2f} ms{tf} peak_extra={extra:.2f} GiB")


def bench_loss_pass(args, dev) -> None:
    """The training pass's LM head + GRPO loss, forward and backward (gradients of the hidden states and the
    weight), at the log-prob pass's T, V, H: eager PyTorch over the logits, the GRPO loss kernel over the logits,
    and train.fused_lm_head_train (chunked linear + log-prob with its own backward, no [T, V] logits)."""
    from r1mega.grpo.fused_lm_head import chunked_linear_logprob
    from r1mega.grpo.logprobs import kernels_available, token_logprobs
    from r1mega.grpo.loss import LossSettings, grpo_loss

    t, v, h = (256, 512, 64) if args.dry_run else (32768, 151936, 2048)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    hidden = torch.randn(1, t, h, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) / math.sqrt(h)).requires_grad_()
    targets = torch.randint(0, v, (1, t), device=dev, generator=g)
    mask = torch.ones(1, t, device=dev)
    adv = torch.randn(1, t, device=dev, generator=g)
    with torch.no_grad():
        old = token_logprobs(hidden @ weight.t(), targets)[0] + 0.01 * torch.randn(1, t, device=dev, generator=g)
    s = LossSettings(eps_low=0.2, eps_high=0.28, beta=0.0, loss_agg="token-mean")

    def torch_loss(logp):
        return grpo_loss(logp, old, None, adv, mask, s)[0]

    paths = {
        "eager": lambda: torch_loss(token_logprobs(hidden @ weight.t(), targets)[0]),
        "fused_train": lambda: torch_loss(chunked_linear_logprob(hidden, weight, targets)[0]),
    }
    if kernels_available():
        import r1mega_kernels

        paths["kernel"] = lambda: r1mega_kernels.grpo_loss(hidden @ weight.t(), targets, old, None, adv, mask)[0]
    grads = None

    def fwd_bwd(loss_fn):
        hidden.grad = weight.grad = None
        loss_fn().backward()

    for name, fn in paths.items():
        _, dt, extra = timed(partial(fwd_bwd, fn), dev, args.steps)
        now = (hidden.grad.float(), weight.grad.float())
        err = (
            ""
            if grads is None
            else " max|dgrad| h/w={:.2e}/{:.2e}".format(*(float((a - b).abs().max()) for a, b in zip(now, grads)))
        )
        grads = now if grads is None else grads
        print(f"loss+backward T={t} V={v} H={h} {name:11s} {dt * 1e3:8.2f} ms (LM head + GRPO loss, fwd + bwd) "
              f"peak_extra={extra:.2f} GiB{err}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script in seconds")
    ap.add_argument("--models", default="qwen3,dsv3")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--modes", default="padded,packed", help="padded | packed | packed_fused (+ fused LM head)")
    ap.add_argument("--layers", type=int, default=None, help="default: qwen3 4, dsv3 2 (dry run 2)")
    ap.add_argument("--tokens", type=int, default=65536, help="real tokens per optimizer step")
    ap.add_argument("--mean-len", type=float, default=2048)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--budget", type=int, default=16384, help="train.max_tokens_per_microbatch for packed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--no-logprob", dest="logprob", action="store_false")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one job (see main)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.dry_run:
        args.tokens, args.mean_len, args.max_len, args.prompt_len, args.budget, args.steps = 400, 24, 64, 6, 128, 1
        args.models, args.precisions, args.modes = "qwen3", "fp32", "padded,packed,packed_fused"
    if args.one:
        sys.exit(run_one(args, args.one))
    # Every configuration in a process of its own: an engine's GPU memory is not given back within a process
    # (megatron's MoE layers leave a reference cycle through autograd's C++ side that gc cannot collect), a CUDA
    # error would poison the context for every later one, and each peak memory is then the configuration's own.
    jobs = ["logprob"] if args.logprob else []
    models, precisions, modes = (x.split(",") for x in (args.models, args.precisions, args.modes))
    jobs += [f"{n}:{p}:{m}" for n in models for p in precisions for m in modes]
    if args.dry_run:  # the tiny CPU model leaks only megabytes: one child for all (the CI test's time), still a child
        jobs = [";".join(jobs)]
    failed = 0
    for job in jobs:
        for attempt in [job] + ([job + ":nofusions"] if ":" in job and ";" not in job else []):
            rc = subprocess.run([sys.executable, "-u", __file__, *argv, "--one", attempt]).returncode
            if rc == 0:
                break
            again = "; again without megatron's fused kernels" if attempt == job else ""
            print(f"{attempt}: FAILED (exit {rc}){again}")
        else:
            failed += 1
    if failed and args.dry_run:
        sys.exit(1)


def run_one(args, jobs: str) -> int:
    """``;``-separated jobs in this process: ``logprob`` (the log-prob and loss passes) or
    ``model:precision:mode[:nofusions]``."""
    from r1mega.config import ParallelConfig
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(), seed=1, device="cpu" if args.dry_run else "auto")
    rc = 0
    benches = []
    for job in jobs.split(";"):
        if job == "logprob":
            benches += [partial(bench_logprob_pass, args, rt.device), partial(bench_loss_pass, args, rt.device)]
        else:
            name, precision, mode, *rest = job.split(":")
            layers = args.layers or (2 if args.dry_run or name == "dsv3" else 4)
            ns = argparse.Namespace(**{**vars(args), "layers": layers})
            benches.append(partial(bench_step, ns, rt, name, precision, mode, not rest))
    try:
        for bench in benches:
            try:
                bench()
            except Exception as e:  # noqa: BLE001 - the loss pass still runs when the log-prob pass fails
                print(f"{bench.func.__name__}{bench.args[2:5]}: FAILED {type(e).__name__}: {str(e)[:400]}")
                rc = 1
    finally:
        shutdown_runtime()
    return rc


if __name__ == "__main__":
    main()
