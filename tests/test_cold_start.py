"""Cold-start SFT data in R1 format from GSM8K train (held out from the RL prompts), and the end-of-turn token
that SFT targets, the engines' stop ids and the eval's decode all use (not a disagreeing ``eos_token``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.config import Config, DataConfig, SFTConfig
from r1mega.data.cold_start import r1_solution, split_cold_start
from r1mega.data.tasks import DataError, load_problems
from r1mega.data.tokenizer import build_tokenizer
from r1mega.rewards.format import format_reward
from r1mega.rewards.math import accuracy_reward
from tests.chatml_tokenizer import build_chatml_tokenizer

TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")
TEST = Path("/work/shared/data/gsm8k/test.jsonl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_r1_solution_of_real_gsm8k_rows():
    first = _rows(TRAIN)[0]["answer"]  # "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n...#### 72"
    assert r1_solution(first) == (
        "<think>Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
        "</think><answer>72</answer>"
    )
    assert r1_solution("no final line") is None and r1_solution("x #### ") is None
    assert r1_solution("3 x 1000 = <<3*1000=3000>>3000\n#### 3,000").endswith("<answer>3000</answer>")
    for row in _rows(TRAIN)[:300]:  # every rewrite earns both R1 rewards against GSM8K's gold answer
        sol = r1_solution(row["answer"])
        gold = row["answer"].split("####")[-1].strip()
        assert "<<" not in sol and ">>" not in sol
        assert format_reward(sol) == 1.0 and accuracy_reward(sol, gold) == 1.0, sol


def _cfg(num_examples: int = 1000, **sft) -> Config:
    data = DataConfig(task="jsonl", path=str(TRAIN), eval_path=str(TEST), num_eval=50, seed=3)
    return Config(data=data, sft=SFTConfig(steps=5, num_examples=num_examples, **sft))


def test_split_is_deterministic_and_holds_sft_rows_out_of_rl():
    cfg = _cfg(path=str(TRAIN))
    train, evals = load_problems(cfg.data)
    rl, demos = split_cold_start(train, evals, cfg)
    assert len(demos) == 1000 and all(d.solution.startswith("<think>") for d in demos)
    taught = {d.question for d in demos}
    assert not taught & {p.question for p in rl}, "an SFT row is also an RL prompt"
    assert rl == [p for p in train if p.question not in taught]  # every other train row stays, in order
    assert len(rl) >= len(train) - 1000
    rows = {r["question"]: r["answer"] for r in _rows(TRAIN)}
    assert all(d.solution == r1_solution(rows[d.question]) for d in demos)
    again = split_cold_start(*load_problems(cfg.data), cfg)
    assert again == (rl, demos)  # deterministic: a resumed run samples the same RL prompts
    cfg.data.seed = 4
    assert split_cold_start(train, evals, cfg)[1] != demos  # the seed picks the rows
    cfg.sft.steps = 0  # the split does not depend on whether the SFT runs (resume skips it)
    cfg.data.seed = 3
    assert split_cold_start(train, evals, cfg) == (rl, demos)


def test_split_never_teaches_a_held_out_eval_question():
    cfg = _cfg(path=str(TRAIN))
    cfg.data.eval_path, cfg.data.num_eval = None, 3000  # held-out rows: the first 3000 train rows
    train, evals = load_problems(cfg.data)
    rl, demos = split_cold_start(train, evals, cfg)
    assert not {d.question for d in demos} & {p.question for p in evals}
    cfg.sft.path = str(TEST)  # every row of the eval file itself is refused as a demonstration
    cfg.data.eval_path, cfg.data.num_eval = str(TEST), 10_000
    with pytest.raises(DataError, match="held-out eval questions"):
        split_cold_start(*load_problems(cfg.data), cfg)


def test_without_sft_path_the_task_keeps_its_own_solutions():
    cfg = Config()  # the arithmetic default: demonstrations are its generated problems, not held out
    train, evals = load_problems(cfg.data)
    assert split_cold_start(train, evals, cfg) == (train, train)


def test_a_row_without_a_final_answer_names_its_line(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(
        json.dumps({"question": "q1", "answer": "1+1=2\n#### 2"})
        + "\n"
        + json.dumps({"question": "q2", "answer": "7"})
        + "\n"
    )
    cfg = _cfg(path=str(p))
    with pytest.raises(DataError, match=rf"{p}:2: sft.path rows need a worked solution ending in '#### N'"):
        split_cold_start(*load_problems(cfg.data), cfg)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return build_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


def test_end_of_turn_is_the_chat_templates_not_the_disagreeing_eos_token(chatml, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml)
    im_start, im_end = hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("<|im_end|>")
    assert (hf.eos_token_id, im_start, im_end) == (1, 1, 2)  # SmolLM2's GGUF layout: eos_token says 1
    tok = build_tokenizer(str(chatml))
    assert tok.eos_id == im_end and tok.eod == im_end  # megatron's inference controller stops on eod
    plain = build_chatml_tokenizer(tmp_path / "plain", chat_template=None)
    assert build_tokenizer(str(plain)).eos_id == 1  # no chat template: the tokenizer's eos_token is all there is


def test_sft_targets_stops_and_decode_use_the_end_of_turn(chatml):
    from r1mega.rollout.base import SamplingParams
    from r1mega.rollout.sglang_io import sampling_dict
    from r1mega.sft import demonstration_batch

    tok = build_tokenizer(str(chatml))
    cfg = _cfg(path=str(TRAIN))
    demos = split_cold_start(*load_problems(cfg.data), cfg)[1][:3]
    batch = demonstration_batch(demos, tok, "chat", multiple=1)
    for i, d in enumerate(demos):
        mask = batch.mask[i].nonzero().flatten()
        targets = batch.tokens[i, mask + 1].tolist()  # mask[j] scores the prediction of token j + 1
        assert targets[-1] == 2 and 1 not in targets, "an SFT target must end the turn with <|im_end|>"
        assert tok.decode(targets) == d.solution
        prompt = batch.tokens[i, : int(mask[0]) + 1].tolist()
        assert prompt == tok.encode_chat(d.question)
    stop = sampling_dict(SamplingParams(max_new_tokens=8), tok.eos_id, seed=None)["stop_token_ids"]
    assert stop == [2]
    # what the eval scores: the text before the end of turn, not a run-on next turn
    run_on = tok.encode("<think>1+1=2</think><answer>2</answer>") + [2] + tok.encode("assistant\n<think>")
    assert tok.decode(run_on) == "<think>1+1=2</think><answer>2</answer>"


def test_train_cli_runs_the_sft_on_held_out_rows_and_rl_on_the_rest(chatml, tmp_path):
    """r1mega-train wires the split: the cold-start SFT runs and the RL prompts are the rest of GSM8K train."""
    import os
    import subprocess
    import sys

    args = [
        "model=tiny_dense", "model.num_layers=1", f"model.tokenizer={chatml}", "data.task=jsonl",
        f"data.path={TRAIN}", f"data.eval_path={TEST}", "data.num_eval=4", "data.template=chat",
        "data.max_prompt_len=512",
        f"sft.path={TRAIN}", "sft.steps=2", "sft.num_examples=16", "sft.batch_size=4", "train.steps=1",
        "rollout.prompts_per_step=2", "algo.group_size=2", "rollout.sampling.max_new_tokens=8", "train.threads=1",
        "logging.wandb_mode=disabled", "logging.plot=false", "logging.progress=false", f"logging.out_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "r1mega.train", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _cfg(path=str(TRAIN), num_examples=16)
    cfg.data.num_eval = 4
    rl, _ = split_cold_start(*load_problems(cfg.data), cfg)
    assert f"{len(rl)} train / 4 held-out problems" in proc.stderr and "cold-start SFT: 2 steps" in proc.stderr
