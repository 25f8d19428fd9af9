"""Worker of the 2-rank gloo vocab-parallel test: runs the kernels on its vocab shard, saves what it computed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import r1mega_kernels as rk  # after the env var: the interpreter is chosen when the kernels are decorated

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inp = torch.load(os.path.join(workdir, "inputs.pt"))
        v0, v1 = inp["bounds"][rank], inp["bounds"][rank + 1]
        group = dist.group.WORLD
        out: dict[str, torch.Tensor] = {}
        z = inp["z"][..., v0:v1].contiguous()
        out["logp"], out["ent"] = rk.logprob_entropy(z, inp["y"], inp["tau"], tp_group=group, vocab_start=v0)

        x = z.clone().requires_grad_()
        loss, stats = rk.grpo_loss(
            x,
            inp["y"],
            inp["old"],
            inp["ref"],
            inp["adv"],
            inp["w"],
            0.2,
            0.28,
            0.04,
            inp["tau"],
            tp_group=group,
            vocab_start=v0,
        )
        loss.backward()
        out["loss"], out["grad"] = loss.detach(), x.grad
        out["g_logp"], out["g_ent"], out["g_clip"], out["g_kl"] = stats

        w_shard = inp["weight"][v0:v1].contiguous()
        out["fl_logp"], out["fl_ent"] = rk.fused_linear_logprob(
            inp["hidden"], w_shard, inp["y"], inp["tau"], tp_group=group, vocab_start=v0, chunk=7
        )
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
