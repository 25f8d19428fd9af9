"""Layer-by-layer comparison of a rollout engine (SGLang) against `transformers` on the same weights and tokens.

Prints, per decoder layer, how far the residual stream of the candidate is from the reference (after the
attention block and after the MLP block), then the modules of the first layer where they part, then the
teacher-forced log-prob gap over every prompt token and the greedy agreement. The reference is the HF model
itself: megatron equals it to ~2e-5 in fp32 (tests/test_hf_export.py, the HF-import tests), so "SGLang vs
transformers" isolates the rollout engine, and ``--megatron`` adds the trainer's own forward when the HF
importer is available.

    # on the GPU machine, SGLang installed (../shared/device/prepare_sglang_carry.sh)
    python3 tools/compare_engines.py --family deepseek_v3            # a tiny random HF model of the family
    python3 tools/compare_engines.py --hf-dir $SMOLLM2_HF --prompts 64
    python3 tools/compare_engines.py --family qwen3_moe --load disk  # SGLang's own loader instead of the push

How SGLang's side is captured: ``debug_tensor_dump_output_folder`` makes SGLang save the output of every leaf
module of every forward pass (``TP0_PP0_Rank0_pid*/PassNNNNN.pt``). Its fused add-RMSNorm returns
``(normed, residual)``, so ``layers.i.post_attention_layernorm[1]`` is the stream after layer i's attention
and ``layers.{i+1}.input_layernorm[1]`` (``norm[1]`` after the last layer) the stream after layer i: the same
points that forward hooks give on the HF model. One prompt per prefill pass, radix cache off, so every pass
holds exactly one prompt's tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1mega.rollout.sglang_server import shutdown_engine, start_engine  # no SGLang import until an engine starts

# ----------------------------------------------------------------------------- tiny random HF models

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")


def tiny_hf_config(family: str, vocab: int = 512, wide: bool = False):
    """A small config of the family with SGLang-friendly head sizes (MLA: kv_lora 512, rope 64).

    Qwen3-MoE has no dense layer (as Qwen3-30B-A3B): SGLang 0.5.17 cannot serve one (docs/perf/sglang.md).
    ``wide`` (llama only): ~1.05 B parameters, 2.1 GB in bf16, for the weight-push throughput row (issue 10).
    """
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=256, num_hidden_layers=3, max_position_embeddings=2048,
                  initializer_range=0.08, tie_word_embeddings=False, rms_norm_eps=1e-6)  # fmt: skip
    gqa = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, rope_theta=1e6)
    if wide:
        if family != "llama":
            raise ValueError("wide=True is a llama config")
        common.update(hidden_size=2048, num_hidden_layers=14, initializer_range=0.02)
        return tf.LlamaConfig(**common, num_attention_heads=16, num_key_value_heads=4, intermediate_size=8192,
                              rope_theta=1e6, head_dim=128)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common, **gqa, head_dim=64)
    if family == "qwen2":
        return tf.Qwen2Config(**common, **gqa)
    if family == "qwen3":
        return tf.Qwen3Config(**common, **gqa, head_dim=64)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **gqa, head_dim=64, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[],
                                 norm_topk_prob=True)  # fmt: skip
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**common, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
                                   moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
                                   num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                   first_k_dense_replace=1, norm_topk_prob=True, q_lora_rank=128,
                                   kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                   rope_theta=1e4, rope_interleave=True,
                                   # keys DeepSeek's own config.json has and SGLang reads (transformers drops them)
                                   moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc")  # fmt: skip
    raise ValueError(f"--family {family!r} is not one of {FAMILIES}")


def make_tiny_hf(
    family: str,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_from: Path | None = None,
    wide: bool = False,
) -> Path:
    """Save a random model of ``family`` as a HF folder. Norm weights and the expert bias are moved off their
    initial values (1 and 0) so that a norm or bias that an engine drops shows up. ``tokenizer_from``: a HF
    folder whose tokenizer files are copied in (the vocab is sized to it), so real prompts can be used."""
    import shutil

    import transformers as tf

    vocab = 512
    if tokenizer_from is not None:
        vocab = len(tf.AutoTokenizer.from_pretrained(str(tokenizer_from)))
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, vocab=vocab, wide=wide)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.to(dtype).save_pretrained(out)
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, Path(out) / f.name)
    return out


# ----------------------------------------------------------------------------- captures


def capture_hf(model, ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Leaf-module outputs (first tensor of a tuple) and the residual-stream points of one prompt, plus the
    [T, V] log-probs. Keys are HF module names without the leading ``model.``."""
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                acts[name] = t.detach().float().reshape(-1, t.shape[-1]).cpu()

        return hook

    layers = model.model.layers
    for i, layer in enumerate(layers):
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(_stream_hook(acts, f"stream.{i}.attn")))
        hooks.append(layer.register_forward_hook(_stream_out_hook(acts, f"stream.{i}.mlp")))
    for name, mod in model.model.named_modules():
        if name and not list(mod.children()):
            hooks.append(mod.register_forward_hook(keep(name)))
    try:
        with torch.no_grad():
            x = torch.tensor([ids], device=model.device)
            logits = model(x).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return acts, torch.log_softmax(logits, -1).cpu()


def _stream_hook(acts, name):
    def hook(_mod, args):
        acts[name] = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()

    return hook


def _stream_out_hook(acts, name):
    def hook(_mod, _inp, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        acts[name] = t.detach().float().reshape(-1, t.shape[-1]).cpu()

    return hook


def sglang_acts(dump: dict, num_layers: int) -> dict[str, torch.Tensor]:
    """One SGLang pass dump -> the same keys as :func:`capture_hf` (leaf names without ``model.``, streams)."""
    out: dict[str, torch.Tensor] = {}
    for key, val in dump.items():
        if not key.startswith("model."):
            continue
        t = val[0] if isinstance(val, (list, tuple)) else val
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out[key[len("model.") :]] = t.float().reshape(-1, t.shape[-1])

    def residual(name):
        v = dump.get(f"model.{name}")
        return v[1].float() if isinstance(v, (list, tuple)) and len(v) > 1 else None

    for i in range(num_layers):
        after_attn = residual(f"layers.{i}.post_attention_layernorm")
        after_mlp = residual(f"layers.{i + 1}.input_layernorm" if i + 1 < num_layers else "norm")
        if after_attn is not None:
            out[f"stream.{i}.attn"] = after_attn
        if after_mlp is not None:
            out[f"stream.{i}.mlp"] = after_mlp
    return out


# ----------------------------------------------------------------------------- comparison


@dataclass
class Row:
    name: str
    rel_rmse: float
    max_abs: float
    cosine: float

    @property
    def parts(self) -> bool:
        return not (self.rel_rmse <= PART_RMSE and self.cosine >= PART_COS)


PART_RMSE, PART_COS = 0.05, 0.995  # bf16 noise stays around 1e-2 relative; a layout bug is O(1)


def compare(ref: torch.Tensor, got: torch.Tensor, name: str) -> Row | None:
    if ref.shape != got.shape:
        return None
    d = (got - ref).double()
    r = ref.double()
    rms = float(r.square().mean().sqrt())
    cos = float(torch.nn.functional.cosine_similarity(r.flatten(), got.double().flatten(), dim=0))
    return Row(name, float(d.square().mean().sqrt()) / max(rms, 1e-12), float(d.abs().max()), cos)


def stream_rows(ref: dict, got: dict, num_layers: int) -> list[Row]:
    rows = []
    for i in range(num_layers):
        for part in ("attn", "mlp"):
            k = f"stream.{i}.{part}"
            if k in ref and k in got and (row := compare(ref[k], got[k], k)):
                rows.append(row)
    return rows


def module_rows(ref: dict, got: dict, prefix: str) -> list[Row]:
    """Leaf modules of one layer present in both (names that match and shapes that agree), in HF order."""
    return [r for k in ref if k.startswith(prefix) and k in got and (r := compare(ref[k], got[k], k))]


def first_parting(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.parts), None)


def logprob_gap(ref_lp: torch.Tensor, ids: list[int], engine_lp: list[float]) -> list[float]:
    """|log p_ref(t_k | t_<k) - log p_engine(t_k | t_<k)| over the prompt's tokens 1..T-1."""
    ref = ref_lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return [abs(float(a) - b) for a, b in zip(ref, engine_lp) if b is not None and math.isfinite(b)]


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n{'point':<44}{'rel rmse':>10}{'max |d|':>11}{'cosine':>10}")
    for r in rows:
        print(f"{r.name:<44}{r.rel_rmse:>10.2e}{r.max_abs:>11.3e}{r.cosine:>10.5f}{'  <- parts' if r.parts else ''}")


# ----------------------------------------------------------------------------- SGLang side (GPU only)


def hf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The HF model's weights by HF name, as the trainer's export streams them (tied lm_head left out)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    named = [(n, p.detach()) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")]
    named += [(n, b.detach()) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    return named


def start_sglang(hf_dir: Path, load: str, dump_dir: Path | None, extra: dict):
    kw = dict(model_path=str(hf_dir), dtype="bfloat16", skip_tokenizer_init=True, attention_backend="triton",
              sampling_backend="pytorch", disable_cuda_graph=True, disable_radix_cache=True,
              mem_fraction_static=0.3, random_seed=0, log_level="error",
              load_format="dummy" if load == "push" else "auto")  # fmt: skip
    if dump_dir is not None:
        kw["debug_tensor_dump_output_folder"] = str(dump_dir)
    kw.update(extra)
    return start_engine(**kw)


def push(engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int = 512 << 20) -> None:
    bucket, size = [], 0
    for n, t in named:
        bucket.append((n, t.contiguous()))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
            bucket, size = [], 0
    if bucket:
        engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
    engine.flush_cache()


def push_flattened(engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int = 512 << 20) -> float:
    """The trainer's push path (r1mega/rollout/weight_push.py: single-dtype FlattenedTensorBucket over CUDA IPC,
    a layer's experts in one bucket); returns GB/s."""
    from r1mega.rollout.weight_push import flattened_payloads, plan_buckets

    t0, nbytes = time.perf_counter(), 0
    for bucket in plan_buckets(([(n, t.contiguous())] for n, t in named), bucket_bytes):
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        payloads, flat = flattened_payloads(bucket, 1)
        engine.update_weights_from_tensor(named_tensors=payloads, load_format="flattened_bucket", flush_cache=False)
        del flat
    engine.flush_cache()
    sec = time.perf_counter() - t0
    log(f"flattened push: {nbytes / 1e9:.3f} GB in {sec:.3f} s = {nbytes / 1e9 / sec:.2f} GB/s")
    return nbytes / 1e9 / sec


def fp32_lm_head(model) -> None:
    """transformers' lm_head in fp32 from the bf16 hidden states and weight (the trainer's train.fp32_lm_head)."""
    head = model.get_output_embeddings()
    head.forward = lambda x: torch.nn.functional.linear(x.float(), head.weight.float())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompt_logprobs(engine, prompts: list[list[int]]) -> list[list[float]]:
    """Teacher-forced log p(t_k | t_<k) of every prompt token, one prefill pass per prompt."""
    log(f"prompt log-probs of {len(prompts)} prompts")
    out = []
    for ids in prompts:
        r = engine.generate(input_ids=ids, sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                            return_logprob=True, logprob_start_len=0)  # fmt: skip
        out.append([x[0] for x in r["meta_info"]["input_token_logprobs"]][1:])
    return out


def read_dumps(dump_dir: Path, prompts: list[list[int]]) -> list[dict | None]:
    """The dump of each prompt's prefill pass, matched by its input ids."""
    files = sorted(dump_dir.glob("TP0_PP0_Rank0_pid*/Pass*.pt"))
    found: list[dict | None] = [None] * len(prompts)
    for f in files:
        d = torch.load(f, map_location="cpu", weights_only=False)
        ids = d.get("model.forward_batch_info.input_ids")
        if ids is None:
            continue
        for k, p in enumerate(prompts):
            if found[k] is None and ids.tolist() == p:
                found[k] = d
    return found


def greedy_equal(ref: list[list[int]], got: list[list[int]], eos: int | None) -> int:
    same = 0
    for a, b in zip(ref, got):
        n = a.index(eos) + 1 if eos is not None and eos in a else len(a)
        same += a[:n] == b[:n]
    return same


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, eos: int | None) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
            out.append(y[0, len(ids) :].tolist())
    return out


def make_prompts(n: int, vocab: int, seed: int, hf_dir: Path | None) -> list[list[int]]:
    """Chat-formatted GSM8K questions for a real model with a tokenizer, random token rows otherwise."""
    tok_file = hf_dir / "tokenizer.json" if hf_dir is not None else None
    data = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"
    if tok_file is not None and tok_file.exists() and data.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        rows = [json.loads(line) for line in data.read_text().splitlines()[:n]]
        return [tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False) for r in rows]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(12, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def evaluate(model, engine, prompts, greedy_prompts, args, dump_dir, tag: str) -> dict:
    """One comparison round on the current weights of both sides."""
    n_layers = model.config.num_hidden_layers
    eng_lp = prompt_logprobs(engine, prompts)
    dumps = read_dumps(dump_dir, prompts) if dump_dir is not None else [None] * len(prompts)
    if dump_dir is not None and dumps[0] is None:  # say what the dumper wrote, to adapt the reader
        files = sorted(dump_dir.rglob("*.pt"))
        keys = list(torch.load(files[0], map_location="cpu", weights_only=False))[:12] if files else []
        print(f"[{tag}] no dump matched prompt 0: {len(files)} files, first keys {keys}")
    gaps, first = [], None
    for k, ids in enumerate(prompts):
        acts, ref_lp = capture_hf(model, ids)
        gaps += logprob_gap(ref_lp, ids, eng_lp[k])
        if k == 0 and dumps[0] is not None:
            sgl = sglang_acts(dumps[0], n_layers)
            rows = stream_rows(acts, sgl, n_layers)
            print_rows(f"[{tag}] residual stream, prompt 0 ({len(ids)} tokens): reference = transformers", rows)
            first = first_parting(rows)
            layer = int(first.name.split(".")[1]) if first else None
            if layer is not None:
                print_rows(f"[{tag}] modules of layer {layer}", module_rows(acts, sgl, f"layers.{layer}."))
    log("transformers greedy")
    eos = getattr(model.config, "eos_token_id", None) if args.hf_dir else None
    eos = eos[0] if isinstance(eos, list) else eos
    ref = hf_greedy(model, greedy_prompts, args.new_tokens, eos)
    sp = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": eos is None}
    if eos is not None:
        sp["stop_token_ids"] = [eos]
    log("engine greedy")
    got = [r["output_ids"] for r in engine.generate(input_ids=greedy_prompts, sampling_params=sp)]
    res = {
        "first_parting": first.name if first else None,
        "logp_gap_mean": sum(gaps) / max(len(gaps), 1),
        "logp_gap_max": max(gaps, default=0.0),
        "tokens": len(gaps),
        "greedy_equal": greedy_equal(ref, got, eos),
        "greedy_prompts": len(greedy_prompts),
    }
    print(f"[{tag}] " + json.dumps(res))
    return res


def perturb(model, scale: float = 0.02) -> None:
    """A stand-in for an optimizer step: every MLP / expert weight moves."""
    g = torch.Generator(device=model.device).manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp." in n and p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * scale
                       * p.float().std())  # fmt: skip


def _main(args) -> int:
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="r1mega_cmp_"))
    hf_dir = args.hf_dir or make_tiny_hf(args.family, tmp / args.family)
    ref_dtype = torch.float32 if args.ref_fp32 else torch.bfloat16  # fp32: the bf16 weights upcast exactly
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=ref_dtype).cuda().eval()
    extra = json.loads(args.engine_kwargs)
    if args.fp32_lm_head:  # both sides: SGLang's enable_fp32_lm_head, transformers' head in fp32
        fp32_lm_head(model)
        extra.setdefault("enable_fp32_lm_head", True)
    send = push_flattened if args.flattened else push
    if args.ref_fp32:  # the floor: transformers' own bf16 forward against the same fp32 reference
        bf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16).cuda().eval()
        floor = []
        for ids in make_prompts(args.prompts, model.config.vocab_size, 0, args.hf_dir):
            floor += logprob_gap(
                capture_hf(model, ids)[1],
                ids,
                capture_hf(bf, ids)[1][torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist(),
            )
        log(f"bf16 floor: transformers bf16 vs fp32 mean |dlogp| {sum(floor) / len(floor):.5f} max {max(floor):.4f}")
        del bf
    vocab = model.config.vocab_size
    prompts = make_prompts(args.prompts, vocab, 0, args.hf_dir)
    greedy_prompts = make_prompts(args.greedy_prompts, vocab, 1, args.hf_dir)
    dump_dir = tmp / "dump"
    log(f"start SGLang on {hf_dir} ({args.load})")
    try:
        engine = start_sglang(hf_dir, args.load, dump_dir, extra)
    except TypeError:  # an SGLang without the tensor dumper: log-prob gap and greedy only
        dump_dir, engine = None, start_sglang(hf_dir, args.load, None, extra)
    summary = {"model": str(args.hf_dir or args.family), "load": args.load}
    try:
        if args.load == "push":
            send(engine, hf_tensors(model))
            log("pushed")
        summary["same_weights"] = evaluate(model, engine, prompts, greedy_prompts, args, dump_dir, "same weights")
        perturb(model)
        send(engine, hf_tensors(model))
        if dump_dir is not None:
            for f in dump_dir.glob("*/Pass*.pt"):
                f.unlink()
        summary["after_push"] = evaluate(model, engine, prompts, greedy_prompts, args, dump_dir, "after change+push")
    finally:
        shutdown_engine(engine)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


def main() -> None:  # pragma: no cover - GPU entry point, exercised on the H200
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=FAMILIES)
    ap.add_argument("--hf-dir", type=Path)
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the teacher-forced log-prob gap")
    ap.add_argument("--greedy-prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--load",
        choices=("push", "disk"),
        default="push",
        help="push: dummy weights at start, then the HF tensors pushed in memory (the trainer's path)",
    )
    ap.add_argument("--engine-kwargs", default="{}", help="JSON of extra sglang.Engine arguments")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument(
        "--ref-fp32", action="store_true", help="reference = transformers in fp32 (and print the bf16 floor)"
    )
    ap.add_argument("--fp32-lm-head", action="store_true", help="LM head in fp32 on both sides (train.fp32_lm_head)")
    ap.add_argument("--flattened", action="store_true", help="push as the trainer does (flattened buckets); GB/s")
    args = ap.parse_args()
    if not (args.family or args.hf_dir):
        ap.error("give --family or --hf-dir")
    raise SystemExit(_main(args))


if __name__ == "__main__":
    main()
