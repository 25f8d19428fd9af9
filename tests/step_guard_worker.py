"""Worker for tests/test_step_guard.py: 2 data-parallel ranks (distributed optimizer), a NaN gradient on rank 1 only.

    torchrun --nproc_per_node 2 tests/step_guard_worker.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.json: whether each of two steps updated, and whether its weights moved.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.objectives.grpo import GRPOObjective
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from tests.parallel_worker import make_batch, make_config

    cfg = make_config("dp2", mla=False, loss_agg="token-mean")
    rt = init_runtime(cfg.parallel, seed=1)
    vocab = CharTokenizer().vocab_size
    policy = MegatronEngine(cfg, rt, vocab)
    objective = GRPOObjective.from_config(cfg, policy.device)
    batch, noise_old, _ = make_batch(vocab)
    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = torch.arange(batch.size).chunk(size)[rank]
    mine = batch.select(rows)
    logp, _ = policy.compute_logprobs(mine, objective.temperature)
    mine.old_logp = (logp + noise_old[rows]) * mine.mask
    mine.ref_logp = logp

    def weights() -> dict:
        return {k: v.clone() for k, v in policy.model.state_dict().items() if torch.is_tensor(v) and "bias" not in k}

    out = {}
    for name, poisoned in (("nan_on_rank1", rank == 1), ("finite", False)):
        before = weights()
        param = next(p for p in policy.model.parameters() if p.requires_grad)
        hook = param.register_hook(lambda g: torch.full_like(g, float("nan"))) if poisoned else None
        m = policy.forward_backward(mine, objective, lr=cfg.optim.lr)
        if hook is not None:
            hook.remove()
        after = weights()
        out[name] = {"update_ok": m["update_ok"], "moved": any(not torch.equal(v, after[k]) for k, v in before.items())}
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    shutdown_runtime()


if __name__ == "__main__":
    main()
