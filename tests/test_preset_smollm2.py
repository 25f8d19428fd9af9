"""The SmolLM2 x GSM8K experiment preset (issue 12) composes into the typed config it documents, and its
cold-start SFT + GRPO steps run on the CPU (rollout=megatron) from a tiny random Llama HF folder built here
with the SmolLM2 special-token layout (tests/chatml_tokenizer.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.config import ModelConfig, SGLangRolloutConfig, config_from_hydra
from tests.chatml_tokenizer import build_tiny_llama
from tests.test_config import _compose

pytestmark = pytest.mark.skipif(
    "hf_path" not in {f.name for f in dataclasses.fields(ModelConfig)},
    reason="model.hf_path arrives with the HF-loading branch (h2); the preset sets it",
)
GSM8K_DIR = "/work/shared/data/gsm8k"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_smollm2"))


def test_preset_composes_to_the_typed_config(tiny_llama, monkeypatch):
    monkeypatch.setenv("GSM8K_DIR", GSM8K_DIR)
    cfg = config_from_hydra(_compose(["+preset=smollm2_gsm8k", f"model.hf_path={tiny_llama}"]))
    assert cfg.model.hf_path == str(tiny_llama) and isinstance(cfg.rollout, SGLangRolloutConfig)
    assert (cfg.data.task, cfg.data.template, cfg.data.path) == ("jsonl", "chat", f"{GSM8K_DIR}/train.jsonl")
    assert cfg.data.eval_path == f"{GSM8K_DIR}/test.jsonl" and cfg.sft.path == cfg.data.path
    assert cfg.sft.steps > 0 and cfg.sft.num_examples == 3000
    assert (cfg.algo.group_size, cfg.rollout.sampling.max_new_tokens, cfg.optim.lr) == (8, 256, 3e-6)
    assert (cfg.train.precision, cfg.train.fp8, cfg.train.eval_every) == ("bf16", None, 25)
    fp8 = config_from_hydra(_compose(["+preset=smollm2_gsm8k", f"model.hf_path={tiny_llama}", "train.fp8=blockwise"]))
    assert fp8.train.fp8 == "blockwise"
    moe = ["+preset=smollm2_gsm8k", f"model.hf_path={tiny_llama}", "model.upcycle_experts=4", "rollout=megatron"]
    assert config_from_hydra(_compose(moe)).model.upcycle_experts == 4


def test_preset_without_a_model_folder_names_the_variable(monkeypatch):
    monkeypatch.delenv("SMOLLM2_HF", raising=False)
    with pytest.raises(Exception, match="SMOLLM2_HF"):
        config_from_hydra(_compose(["+preset=smollm2_gsm8k"]))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_preset_sft_and_grpo_steps_run_on_cpu(tiny_llama, tmp_path, layout):
    """Two SFT and two GRPO steps of the preset, shrunk to CPU sizes; the rollout engine and the trainer agree.
    ``packed``: the trainer's log-probs over THD-packed microbatches (``train.max_tokens_per_microbatch=600``: about
    two prompt + answer sequences each) still equal the engine's own, computed token by token with its KV cache."""
    out = tmp_path / "run"
    pack = ["train.max_tokens_per_microbatch=600"] if layout == "packed" else []
    args = [
        "+preset=smollm2_gsm8k", f"model.hf_path={tiny_llama}", "rollout=megatron", "train.device=cpu",
        "train.precision=fp32", "train.steps=2", "train.eval_every=0", "sft.steps=2", "sft.batch_size=4",
        "sft.num_examples=64", "rollout.prompts_per_step=2", "algo.group_size=2", "rollout.sampling.max_new_tokens=8",
        "data.num_eval=4", "train.micro_batch_size=4", "train.threads=1", "reward.num_workers=1",
        "logging.wandb_mode=disabled", "logging.plot=false", "logging.progress=false", f"logging.out_dir={out}", *pack,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GSM8K_DIR": GSM8K_DIR, "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "r1mega.train", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cold-start SFT: 2 steps" in proc.stderr and "/ 4 held-out problems" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/kl" in r]
    assert len(steps) == 2 and all(math.isfinite(r["train/loss"]) for r in steps)
    assert steps[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT model
    assert all(r["rollout/logp_diff_max"] < 1e-4 for r in steps)  # megatron rollout == trainer on the CPU
    assert all(r["response/length_mean"] <= 8 for r in steps)


def test_r1mega_eval_reads_an_hf_folder_and_answers_as_transformers(tiny_llama, tmp_path):
    """r1mega-eval with model.hf_path (how the e2e bench evaluates the cold-start, r1mega and TRL checkpoints):
    its greedy answers are transformers' greedy answers of the same folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.eval.templates import prompt_text

    args = [
        "+preset=smollm2_gsm8k", f"model.hf_path={tiny_llama}", "rollout=megatron", "train.device=cpu",
        "train.precision=fp32", "eval.sets=[gsm8k]", "eval.limit=2", "eval.greedy=true", "eval.max_new_tokens=8",
        "reward.num_workers=1", "logging.wandb_mode=disabled", f"logging.out_dir={tmp_path}", "train.threads=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GSM8K_DIR": GSM8K_DIR}
    proc = subprocess.run([sys.executable, "-m", "r1mega.eval.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["sets"]["gsm8k"]
    tok = build_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for row in rows:
        ids = torch.tensor([tok.encode(prompt_text(row["question"], "chat", tok))])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=0)
        assert row["samples"][0]["response"] == tok.decode(out[0, ids.shape[1] :].tolist())
