"""Two gloo ranks stopped at different chunks resume from the same one (tests/test_eval_resume.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1mega.config import RewardConfig  # noqa: E402
from r1mega.data.tokenizer import CharTokenizer  # noqa: E402
from r1mega.eval.runner import evaluate  # noqa: E402
from r1mega.rewards import RewardScorer  # noqa: E402
from tests.test_eval_resume import SETS, TEXTS, Engine, _settings  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1]) / "eval.json"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = CharTokenizer()
    with RewardScorer(RewardConfig(num_workers=1)) as scorer:
        try:  # rank 0 stops in chunk 2, rank 1 in chunk 1: their files hold 2 and 1 finished chunks
            evaluate(Engine(TEXTS, fail_at=2 - rank), tok, scorer, SETS, _settings(), chunks_path=out)
        except RuntimeError:
            pass
        again = Engine(TEXTS[2:])
        evaluate(again, tok, scorer, SETS, _settings(), chunks_path=out)
    # a file per rank: the ranks' stdout share one pipe and their lines can interleave
    (out.parent / f"calls.rank{rank}.json").write_text(json.dumps(again.calls))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
