"""A trainer-like process for tests/test_orphans.py: real reward workers busy on a power tower (big-integer
arithmetic that holds the GIL), while the main thread writes checkpoints back to back. Prints what it started."""

from __future__ import annotations

import itertools
import shutil
import sys
import threading
from pathlib import Path

from r1mega.checkpoint import save_model
from r1mega.config import RewardConfig
from r1mega.data.tokenizer import CharTokenizer
from r1mega.engine import MegatronEngine
from r1mega.parallel.runtime import init_runtime
from r1mega.rewards import RewardScorer
from tests.test_trainer import small_config

TOWERS = ["<think>t</think><answer>9^{9^{9}}</answer>", "<think>t</think><answer>10^{10^{10}}</answer>"]


def main(save_dir: str) -> None:
    cfg = small_config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_experts, m.moe_ffn_hidden_size = 4, 256, 1024, 8, 256
    rt = init_runtime(cfg.parallel, seed=1, device="cpu")
    policy = MegatronEngine(cfg, rt, CharTokenizer().vocab_size)
    scorer = RewardScorer(RewardConfig(num_workers=2, timeout_s=3600.0, batch_timeout_s=3600.0))  # never times out
    scorer.start(wait=True)
    threading.Thread(target=scorer.score, args=(TOWERS, ["\\frac{1}{2}"] * 2), daemon=True).start()
    print("workers", *[w.proc.pid for w in scorer._workers], flush=True)
    for step in itertools.count():
        path = Path(save_dir) / f"step_{step % 2}"
        shutil.rmtree(path, ignore_errors=True)
        save_model(policy.model, path)  # megatron's writer: a Manager process + forked writer processes
        if step == 0:
            print("saved", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
