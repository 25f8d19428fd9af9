"""Worker for the multi-rank HF-load tests: load HF checkpoints under one parallel layout, compute logits, export.

    torchrun --nproc_per_node 2 tests/hf_load_worker.py --layout tp2 --out DIR qwen3=/path/a llama=/path/b

For each checkpoint, rank 0 writes DIR/<name>/logits.pt (the full logits, gathered over TP, from the last
pipeline stage) and DIR/<name>/load_rank<r>.json (peak host memory of the load); every rank takes part in
exporting the model to DIR/<name>/export (a HF folder) under the same layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2), "tp3": dict(tp=3)}


def forward_logits(gpt, toks):
    """Full logits on global rank 0 (None elsewhere): a hand-driven 2-stage pipeline, then a TP gather."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.hf_models import megatron_logits

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if pp > 1:
        b, s = toks.shape
        if stage > 0:
            h = torch.empty(s, b, gpt.config.hidden_size)
            dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
            gpt.set_input_tensor(h)
        out = megatron_logits(gpt, toks)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = None
    else:
        out = megatron_logits(gpt, toks)
    if out is not None and ps.get_tensor_model_parallel_world_size() > 1:
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    # the last stage's TP rank 0 holds them: bring them to global rank 0
    last = stage == pp - 1 and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    box = [out if last else None]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, box[0])
    return next(o for o in objs if o is not None) if dist.get_rank() == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--upcycle", type=int, default=0, help="model.upcycle_experts (top-2, shared expert)")
    ap.add_argument("ckpts", nargs="+", help="name=path")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from r1mega.config import ModelConfig, ParallelConfig, TrainConfig
    from r1mega.model.builder import build_gpt_model
    from r1mega.model.hf_io import save_hf_folder
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from tests.hf_models import tokens

    torch.set_num_threads(1)
    par = ParallelConfig(**LAYOUTS[args.layout], etp=1)
    init_runtime(par, seed=0, device="cpu")
    for spec in args.ckpts:
        name, path = spec.split("=", 1)
        out = Path(args.out) / name
        m = resolve_model_config(ModelConfig(hf_path=path, upcycle_experts=args.upcycle, moe_router_topk=2))
        gpt = build_gpt_model(m, par, TrainConfig(), m.vocab_size, torch.device("cpu")).eval()
        report = load_hf_weights(gpt, m)
        logits = forward_logits(gpt, tokens(min(m.vocab_size, 1000), 2, 12))
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(logits[..., : m.vocab_size].clone(), out / "logits.pt")
        dist.barrier()
        (out / f"load_rank{dist.get_rank()}.json").write_text(json.dumps(dataclasses.asdict(report)))
        if not args.no_export:
            save_hf_folder(gpt, m, m.vocab_size, out / "export", dtype=torch.float32, shard_bytes=100_000)
    shutdown_runtime()


if __name__ == "__main__":
    sys.exit(main())
