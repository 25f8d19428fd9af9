"""The bf16 floor of a model: how far bf16 forwards are from the fp32 forward, and from each other.

Teacher-forced log-probs of the same tokens (GSM8K chat prompts, the tail of each prompt scored as a response)
from four forwards of one HF folder: transformers fp32 (the exact reference), transformers bf16 with its bf16 LM
head and with an fp32 head, and r1mega's trainer (MegatronEngine, bf16, ``train.fp32_lm_head``); plus the exact
logits scored the way SGLang's ``rl_on_policy_target`` mode returns log-probs (rounded to bf16, bf16 log_softmax).
Two bf16 implementations that round differently cannot agree closer than their distances from fp32 allow: this
is the floor under issue 10's SGLang-vs-trainer gap (docs/perf/sglang.md). CPU or GPU.

    python tools/bf16_floor.py --hf-dir ~/.cache/r1mega/smollm2-135m-instruct-0.1.2 --prompts 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))


def hf_logprobs(model, rows: list[list[int]], fp32_head: bool, bf16_softmax: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs; ``bf16_softmax``: log_softmax of the logits rounded to bf16, in bf16 (what sglang 0.5.17's
    sampler returns under ``rl_on_policy_target``, srt/layers/sampler.py, at temperature 1)."""
    out = []
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids], device=model.device)
            if fp32_head:
                h = model.model(x).last_hidden_state
                logits = torch.nn.functional.linear(h.float(), model.lm_head.weight.float())
            else:
                logits = model(x).logits.float()
            logits = logits[0, :-1].bfloat16() if bf16_softmax else logits[0, :-1]
            out.append(torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0].float().cpu())
    return out


def measure(hf_dir: Path, prompts: int = 6, split: int = 40) -> dict[str, tuple[float, float]]:
    """{pair: (mean, max) |dlogp|} over the scored tokens; prints the table."""
    from compare_trainer_engine import Setup, build_config, gsm8k_questions
    from transformers import AutoModelForCausalLM

    from r1mega.data.tasks import encode_prompt
    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.rollout.base import Rollout
    from r1mega.trainer import build_token_batch

    hf_dir = Path(hf_dir)
    cuda = torch.cuda.is_available()
    ns = argparse.Namespace(engine="megatron", new_tokens=8, overrides=["data.template=chat", "train.precision=bf16",
                            "train.fp32_lm_head=true"])  # fmt: skip
    cfg = build_config(ns, hf_dir)
    tok = build_tokenizer(cfg.model.tokenizer)
    rows = [encode_prompt(tok, q, "chat") for q in gsm8k_questions(prompts)]
    cfg.data.max_prompt_len = max(map(len, rows))
    s = Setup(cfg, "megatron", tok)
    try:
        rolls = [Rollout(r[:split], r[split:], [], True) for r in rows]
        batch = build_token_batch(rolls, tok.pad_id, s.policy.seq_multiple)
        lp, _ = s.policy.compute_logprobs(batch, 1.0)
        mask = batch.mask.bool()
        megatron = [lp[i].float().cpu()[mask[i]] for i in range(len(rows))]
    finally:
        s.close()
    dev = "cuda" if cuda else "cpu"
    fp32 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(dev).eval()
    ref = hf_logprobs(fp32, rows, False)
    bf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(dev).eval()
    cut = [r[split - 1 :] for r in ref]  # the scored tokens: targets split..end
    sides = {
        "r1mega trainer bf16, fp32 head": megatron,
        "transformers bf16, bf16 head": [r[split - 1 :] for r in hf_logprobs(bf, rows, False)],
        "transformers bf16, fp32 head": [r[split - 1 :] for r in hf_logprobs(bf, rows, True)],
        "fp32 forward, bf16 logits + bf16 log_softmax": [r[split - 1 :] for r in hf_logprobs(fp32, rows, False, True)],
    }

    def gap(a, b):
        d = torch.cat([(x - y).abs() for x, y in zip(a, b)])
        return float(d.mean()), float(d.max()), d.numel()

    out = {f"{name} vs fp32": gap(v, cut)[:2] for name, v in sides.items()}
    two = "r1mega trainer bf16 vs transformers bf16 (both fp32 heads)"
    out[two] = gap(sides["r1mega trainer bf16, fp32 head"], sides["transformers bf16, fp32 head"])[:2]
    print(f"{hf_dir.name}: {sum(map(len, cut))} teacher-forced tokens on {dev}")
    print(f"{'pair':<64}{'mean |dlogp|':>14}{'max':>9}")
    for name, (m, x) in out.items():
        print(f"{name:<64}{m:>14.4f}{x:>9.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--split", type=int, default=40, help="tokens of each prompt kept as its prompt; the rest scored")
    a = ap.parse_args()
    measure(a.hf_dir, a.prompts, a.split)


if __name__ == "__main__":
    main()
