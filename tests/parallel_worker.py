"""Worker for tests/test_parallel.py: one parallel layout computes log-probs, GRPO loss and grad norm.

    python tests/parallel_worker.py --layout ws1 --ckpt DIR --out ref.json --save
    torchrun --nproc_per_node 2 tests/parallel_worker.py --layout tp2 --ckpt DIR --out tp2.json

Every layout loads the same weights from a megatron dist checkpoint (saved by the ws1 run), gets the
same global batch (each data-parallel rank takes its rows), and rank 0 writes what the last pipeline
stage computed, in global row order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

LAYOUTS = {"ws1": {}, "tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2ep2": {"tp": 2, "ep": 2}, "dp2": {}}


def make_config(layout: str, mla: bool, loss_agg: str, loss_impl: str = "auto"):
    from r1mega.config import Config

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size = 2, 64, 4, 128
    m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size, m.moe_router_topk = 4, 32, 32, 2
    m.max_position_embeddings = 64
    if os.environ.get("FROZEN_EXPERT_BIAS") == "1":  # padded rows route their padding: the bias update differs
        m.moe_router_bias_update_rate = 0.0
    if mla:
        m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank = True, 32, 32
        m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim = 16, 8, 16
        m.qk_layernorm = True
    for k, v in LAYOUTS[layout].items():
        setattr(cfg.parallel, k, v)
    cfg.parallel.etp = 1
    cfg.parallel.distributed_optimizer = os.environ.get("DISTOPT", "1") == "1"
    cfg.train.micro_batch_size = 2
    cfg.algo.beta, cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.loss_agg = 0.05, 0.2, 0.28, loss_agg
    cfg.algo.loss_impl = {"triton-fused": "triton", "fused-train": "torch"}.get(loss_impl, loss_impl)
    cfg.train.fused_lm_head = loss_impl == "triton-fused"  # log-prob passes from hidden states, no logits
    cfg.train.fused_lm_head_train = loss_impl == "fused-train"  # the training pass too (its own backward)
    cfg.optim.lr = 1e-3
    cfg.train.max_tokens_per_microbatch = int(os.environ.get("PACK_TOKENS", "0"))  # >0: packed (THD) microbatches
    return cfg


def make_batch(vocab: int, b: int = 8, s: int = 24):
    """Deterministic global batch: random prompts / responses of varying length, right-padded."""
    import torch

    from r1mega.batch import TokenBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(6, vocab, (b, s), generator=g)
    mask = torch.zeros(b, s - 1)
    for i in range(b):
        p = 3 + i % 4
        n = 4 + (3 * i) % (s - p - 4)
        mask[i, p - 1 : p - 1 + n] = 1.0
        tokens[i, p + n :] = 0
    adv = torch.randn(b, 1, generator=g) * mask
    noise_old = 0.3 * torch.randn(b, s - 1, generator=g)
    noise_ref = 0.3 * torch.randn(b, s - 1, generator=g)
    return TokenBatch(tokens=tokens, mask=mask, advantages=adv), noise_old, noise_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--loss-agg", default="seq-mean-token-mean")
    ap.add_argument("--loss-impl", default="auto", help="triton: the r1mega_kernels loss (TRITON_INTERPRET=1 on CPU)")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from r1mega.checkpoint import load_model, save_model
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.objectives.grpo import GRPOObjective
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    cfg = make_config(args.layout, args.mla, args.loss_agg, args.loss_impl)
    rt = init_runtime(cfg.parallel, seed=1)
    vocab = CharTokenizer().vocab_size
    policy = MegatronEngine(cfg, rt, vocab)
    objective = GRPOObjective.from_config(cfg, policy.device)
    if args.save:
        save_model(policy.model, args.ckpt)
    else:
        load_model(policy.model, args.ckpt)
    policy.reset_reference()
    batch, noise_old, noise_ref = make_batch(vocab)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = torch.arange(batch.size).chunk(dp_size)[dp_rank]
    mine = batch.select(rows)
    logp, ent = policy.compute_logprobs(mine, objective.temperature)
    # old / reference log-probs away from the current ones, so both clip sides and the KL are active
    mine.old_logp = (logp + noise_old[rows]) * mine.mask
    mine.ref_logp = (logp + noise_ref[rows]) * mine.mask
    metrics = policy.forward_backward(mine, objective, lr=cfg.optim.lr)
    logp_after, _ = policy.compute_logprobs(mine, objective.temperature)
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    payload = (dp_rank, rows.tolist(), logp.tolist(), ent.tolist(), logp_after.tolist()) if last else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    if dist.get_rank() == 0:
        parts = sorted(p for p in gathered if p is not None)
        out = {
            "logp": [r for p in parts for r in p[2]],
            "entropy": [r for p in parts for r in p[3]],
            "logp_after_step": [r for p in parts for r in p[4]],
            "mask": batch.mask.tolist(),
            "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
            "clip_frac": metrics["clip_frac"] / metrics["tokens"],
            "kl": metrics["kl"] / metrics["tokens"],
        }
        with open(args.out, "w") as f:
            json.dump(out, f)
    shutdown_runtime()


if __name__ == "__main__":
    sys.exit(main())
