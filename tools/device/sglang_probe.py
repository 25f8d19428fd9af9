"""GPU probe of the SGLang rollout backend against megatron's own engine on the same weights.

Run on the H200 after ../shared/device/prepare_sglang_carry.sh's three commands (and the small wheels of
.device/w):  python3 tools/device/sglang_probe.py
It builds a tiny DeepSeek-V3-architecture policy (MLA with SGLang-sized latents, sigmoid router with expert
bias, shared expert, one dense layer), pushes its weights into SGLang, and compares greedy tokens and
per-token log-probs with the megatron engine; then release -> update -> resume, and a weight change.
"""

from __future__ import annotations

import os
import time


def probe_config():
    from r1mega.config import Config, SGLangRolloutConfig

    cfg = Config(rollout=SGLangRolloutConfig())
    m = cfg.model
    m.name, m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size = "probe_v3", 2, 512, 4, 1024
    m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size, m.moe_router_topk = 8, 128, 128, 2
    m.moe_router_topk_scaling_factor, m.first_k_dense_layers, m.moe_router_dtype = 2.5, 1, "fp32"
    m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank = True, 128, 512
    m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim, m.qk_layernorm = 128, 64, 128, True
    m.max_position_embeddings = 256
    cfg.train.precision, cfg.algo.beta = "bf16", 0.0
    return cfg


def main() -> None:
    import torch

    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime
    from r1mega.rollout.base import SamplingParams
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg = probe_config()
    rt = init_runtime(cfg.parallel, 0, device="cuda")
    tok = CharTokenizer()
    policy = MegatronEngine(cfg, rt, tok.vocab_size)
    with torch.no_grad():
        # a peaked distribution makes greedy paths differ by prompt (it also amplifies bf16 noise in the logits)
        policy.model.output_layer.weight.mul_(float(os.environ.get("SHARPEN", "30")))
    prompts = [tok.encode(q) for q in ("12+34=?", "7+5=?", "99+1=?", "3+48=?")]
    greedy = SamplingParams(top_k=1, max_new_tokens=16)
    meg = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 8, 64)
    rows = []

    def compare(name, ref, got):
        same = sum(a.response_ids == b.response_ids for a, b in zip(ref, got))
        diffs = [abs(x - y) for a, b in zip(ref, got) for x, y in zip(a.logprobs, b.logprobs) if x == x and y == y]
        rows.append(
            (
                name,
                f"{same}/{len(ref)}",
                max(diffs) if diffs else float("nan"),
                sum(diffs) / len(diffs) if diffs else float("nan"),
            )
        )
        print(name, [tok.decode(r.response_ids) for r in got], flush=True)

    a = meg.generate(prompts, greedy)
    t0 = time.perf_counter()
    sg = SGLangRolloutEngine(cfg, policy.weights, tok, engine_kwargs={"mem_fraction_static": 0.3})
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = sg.generate(prompts, greedy)
    t_first = time.perf_counter() - t0
    compare("sglang vs megatron (first push)", a, b)
    free0 = torch.cuda.mem_get_info()[0]
    sg.release_memory()
    freed = (torch.cuda.mem_get_info()[0] - free0) / 1e9
    t0 = time.perf_counter()
    sg.update_weights(policy.weights)
    t_push = time.perf_counter() - t0
    sg.resume_memory()
    compare("after release/update/resume", b, sg.generate(prompts, greedy))
    with torch.no_grad():
        policy.model.output_layer.weight.mul_(0.5)
        for p in policy.model.decoder.layers[1].mlp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sg.release_memory()
    sg.update_weights(policy.weights)
    sg.resume_memory()
    compare("after a weight change", meg.generate(prompts, greedy), sg.generate(prompts, greedy))
    sg.shutdown()
    print(
        f"\nengine start {t_start:.1f} s, first generate (incl. push) {t_first:.2f} s, push {t_push:.2f} s, "
        f"release freed {freed:.1f} GB"
    )
    print(f"{'check':<34}{'same greedy':>12}{'max |dlogp|':>13}{'mean |dlogp|':>14}")
    for name, same, d, md in rows:
        print(f"{name:<34}{same:>12}{d:>13.4f}{md:>14.5f}")


if __name__ == "__main__":
    main()
