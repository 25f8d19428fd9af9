"""End to end on the CPU: a tiny dense model after the default cold-start SFT, evaluated by the runner (greedy,
against an independent generate + accuracy_reward) and by the ``r1mega-eval`` CLI (k=4 samples: the table, the
JSON, metrics.jsonl), whose every number is recomputed here from the JSON's raw responses."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model=tiny_dense", "data.num_eval=32", "train.threads=2", "logging.wandb_mode=disabled"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.config import register_configs
    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose("eval", overrides=overrides))


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """The tiny dense model after 100 steps of the default cold-start SFT, saved as a megatron checkpoint."""
    from r1mega.checkpoint import save_model
    from r1mega.data.tasks import load_problems
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine
    from r1mega.sft import cold_start_sft

    cfg = _compose([*OVERRIDES, "sft.steps=100", "algo.beta=0"])
    rt = init_runtime(cfg.parallel, cfg.train.seed, "cpu", cfg.train.threads)
    try:
        tok = CharTokenizer()
        train, heldout = load_problems(cfg.data)
        policy = MegatronEngine(cfg, rt, tok.vocab_size)
        raw = tmp_path_factory.mktemp("raw") / "ckpt"
        save_model(policy.model, raw)  # the initial weights: another model of the same architecture
        cold_start_sft(cfg, policy, train, tok)
        ckpt = tmp_path_factory.mktemp("sft") / "ckpt"
        save_model(policy.model, ckpt)
        engine = MegatronRolloutEngine(policy.model, tok, policy.padded_vocab, 64, 64)
        yield SimpleNamespace(cfg=cfg, rt=rt, tok=tok, train=train, heldout=heldout, engine=engine, ckpt=ckpt, raw=raw)
    finally:
        shutdown_runtime()


def test_greedy_runner_matches_independent_generation(sft_model):
    from r1mega.eval.runner import EvalSettings, evaluate
    from r1mega.rewards import RewardScorer, accuracy_reward, format_reward
    from r1mega.rollout.base import SamplingParams

    m = sft_model
    settings = EvalSettings(greedy=True, template="compact", max_new_tokens=24, chunk_problems=32, progress=False)
    with RewardScorer(m.cfg.reward) as scorer:
        res = evaluate(m.engine, m.tok, scorer, {"heldout": m.heldout}, settings)
    prompts = [m.tok.encode(f"{p.question}=?") for p in m.heldout]
    rolls = m.engine.generate(prompts, SamplingParams(1.0, 1.0, 1, 24))
    texts = [m.tok.decode(r.response_ids) for r in rolls]
    correct = [accuracy_reward(t, p.answer) > 0 for t, p in zip(texts, m.heldout)]
    got = res.sets["heldout"]
    assert [p.samples[0].correct for p in got.problems] == correct
    assert [p.samples[0].response for p in got.problems] == texts
    assert [p.index for p in got.problems] == list(range(len(m.heldout)))
    s = got.metrics
    assert s["pass@1"] == pytest.approx(sum(correct) / len(correct)) and s["cons@1"] == s["pass@1"]
    assert s["format_rate"] == pytest.approx(sum(format_reward(t) for t in texts) / len(texts))
    assert s["pass@1"] > 0, "the default cold-start SFT reaches non-zero held-out accuracy"
    assert res.generated_tokens == sum(len(r.response_ids) for r in rolls)


def _run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    return subprocess.run(
        [sys.executable, "-m", "r1mega.eval.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _brute_pass_at(flags: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_cli_table_json_and_numbers_recomputed_from_the_json(sft_model, tmp_path):
    from r1mega.rewards import extract_answer, format_reward, is_equivalent

    mine = tmp_path / "mine.jsonl"  # a user's own file, own keys: problems the SFT saw
    mine.write_text("".join(json.dumps({"q": p.question, "a": int(p.answer)}) + "\n" for p in sft_model.train[:16]))
    out = tmp_path / "run"
    args = [*OVERRIDES, f"model.checkpoint={sft_model.ckpt}", f"eval.sets=[heldout,{mine}]", "eval.question_key=q"]
    args += ["eval.answer_key=a", "eval.k=4", "eval.chunk_problems=16", "eval.max_new_tokens=24"]
    args += ["eval.also_greedy=true"]
    proc = _run_cli([*args, f"logging.out_dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for text in ("r1mega-eval (k=4, T=0.6, top-p=0.95, template compact)", "pass@1", "pass@4", "cons@4", "mine"):
        assert text in proc.stderr, text
    data = json.loads((out / "eval.json").read_text())
    assert data["settings"]["k"] == 4 and data["meta"]["checkpoint"] == str(sft_model.ckpt)
    assert [len(data["sets"][s]) for s in ("heldout", "mine")] == [32, 16]
    total_correct = 0
    for name, problems in data["sets"].items():
        flags_all, cons = [], []
        for p in problems:
            assert len(p["samples"]) == 4
            for s in p["samples"]:  # every sample re-scored from its raw response
                assert s["answer"] == extract_answer(s["response"])
                assert s["correct"] == (s["answer"] is not None and is_equivalent(s["answer"], p["gold"]))
                assert s["format"] == (format_reward(s["response"]) > 0)
            flags = [s["correct"] for s in p["samples"]]
            flags_all.append(flags)
            counts: dict[str, list[int]] = {}  # votes: the first earlier answer it is equivalent to, either way
            for i, a in enumerate(s["answer"] for s in p["samples"]):
                if a is not None:
                    rep = next((r for r in counts if a == r or is_equivalent(a, r) or is_equivalent(r, a)), a)
                    counts.setdefault(rep, [i, 0])[1] += 1
            win = min(counts.items(), key=lambda kv: (-kv[1][1], kv[1][0]), default=None)
            cons.append(win is not None and flags[win[1][0]])
            assert p["voted"] == (win and win[0]) and p["num_correct"] == sum(flags)
        summary = data["summary"][name]
        assert summary["pass@1"] == pytest.approx(sum(sum(f) / 4 for f in flags_all) / len(problems))
        for k in (2, 4):
            assert summary[f"pass@{k}"] == pytest.approx(sum(_brute_pass_at(f, k) for f in flags_all) / len(problems))
        assert summary["cons@4"] == pytest.approx(sum(cons) / len(problems))
        total_correct += sum(map(sum, flags_all))
    assert total_correct > 0
    progress = json.loads((out / "eval_progress.json").read_text())  # chunk by chunk; its last state = the summary
    assert progress["chunks_done"] == progress["chunks"] == 3  # 48 problems in chunks of 16
    for name in ("heldout", "mine"):
        for key in ("pass@1", "format_rate", "answer_rate", "length_mean", "truncated_frac"):
            assert progress["sets"][name][key] == pytest.approx(data["summary"][name][key]), (name, key)
    assert progress["generated_tokens"] == data["generated_tokens"]
    assert not list(out.glob("eval_chunks.rank*.jsonl"))  # the finished chunks go once eval.json is written
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/heldout/pass@1"] == pytest.approx(data["summary"]["heldout"]["pass@1"])
    # eval.also_greedy: the same model's greedy answers, in the same run, equal to the runner's greedy pass
    greedy = json.loads((out / "eval_greedy.json").read_text())
    assert greedy["settings"]["greedy"] is True and not list(out.glob("eval_greedy_chunks.rank*.jsonl"))
    assert [len(p["samples"]) for p in greedy["sets"]["heldout"]] == [1] * 32
    from r1mega.eval.runner import EvalSettings, evaluate
    from r1mega.rewards import RewardScorer

    how = EvalSettings(greedy=True, template="compact", max_new_tokens=24, chunk_problems=16, progress=False)
    with RewardScorer(sft_model.cfg.reward) as scorer:
        ref = evaluate(sft_model.engine, sft_model.tok, scorer, {"heldout": sft_model.heldout}, how)
    assert [p["samples"][0]["response"] for p in greedy["sets"]["heldout"]] == [
        p.samples[0].response for p in ref.sets["heldout"].problems
    ]
    assert greedy["summary"]["heldout"]["pass@1"] == pytest.approx(ref.sets["heldout"].metrics["pass@1"])
    assert logged[0]["eval_greedy/heldout/pass@1"] == greedy["summary"]["heldout"]["pass@1"]  # its own row
    assert "r1mega-eval (greedy, template compact)" in proc.stderr


def test_cli_evaluates_several_models_on_one_engine(sft_model, tmp_path):
    """eval.models: the SFT model, then the initial weights loaded into the same policy and engine; each label's
    greedy answers equal an independent evaluation of that checkpoint alone (the swap leaves nothing behind)."""
    from r1mega.checkpoint import load_model
    from r1mega.engine import MegatronEngine
    from r1mega.eval.runner import EvalSettings, evaluate
    from r1mega.rewards import RewardScorer
    from r1mega.rollout.megatron_engine import MegatronRolloutEngine

    m, out = sft_model, tmp_path / "run"
    args = [*OVERRIDES, f"eval.models=[sft:{m.ckpt},raw:{m.raw}]", "eval.sets=[heldout]", "eval.greedy=true"]
    args += ["eval.max_new_tokens=24", "eval.chunk_problems=32", f"logging.out_dir={out}"]
    proc = _run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "raw: weights loaded and pushed in" in proc.stderr
    raw_policy = MegatronEngine(m.cfg, m.rt, m.tok.vocab_size)
    load_model(raw_policy.model, m.raw)
    raw_engine = MegatronRolloutEngine(raw_policy.model, m.tok, raw_policy.padded_vocab, 64, 64)
    how = EvalSettings(greedy=True, template="compact", max_new_tokens=24, chunk_problems=32, progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with RewardScorer(m.cfg.reward) as scorer:
        for label, engine, path in (("sft", m.engine, m.ckpt), ("raw", raw_engine, m.raw)):
            ref = evaluate(engine, m.tok, scorer, {"heldout": m.heldout}, how).sets["heldout"]
            data = json.loads((out / label / "eval.json").read_text())
            assert data["meta"]["label"] == label and data["meta"]["checkpoint"] == str(path)
            got = [p["samples"][0]["response"] for p in data["sets"]["heldout"]]
            assert got == [p.samples[0].response for p in ref.problems], label
            row = next(r for r in logged if f"eval/{label}/heldout/pass@1" in r)
            assert row[f"eval/{label}/heldout/pass@1"] == pytest.approx(ref.metrics["pass@1"])
    assert data["summary"]["heldout"]["pass@1"] < json.loads((out / "sft" / "eval.json").read_text())["summary"][
        "heldout"]["pass@1"], "the SFT model beats its initial weights"  # fmt: skip


def test_cli_refuses_a_missing_model_folder_before_loading(tmp_path):
    proc = _run_cli([*OVERRIDES, f"eval.models=[a:{tmp_path / 'nope'}]", "eval.sets=[heldout]"], tmp_path)
    assert proc.returncode == 2 and "eval.models.a=" in proc.stderr and "no such folder" in proc.stderr


def test_cli_stops_on_a_malformed_row_before_building_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": 2}\n{"question": "2+2" "answer": 4}\n')
    proc = _run_cli([*OVERRIDES, "model.checkpoint=/nonexistent", f"eval.sets=[{bad}]"], tmp_path)
    assert proc.returncode == 2 and f"{bad}:2: not valid JSON" in proc.stderr, proc.stderr[-2000:]


def test_eval_sbatch_parses_and_refuses_to_run_outside_slurm():
    script = ROOT / "slurm" / "eval.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "submit with sbatch" in r.stderr
    assert "R1MEGA_MODULE=r1mega.eval.cli" in script.read_text()
    assert '-m "${R1MEGA_MODULE:-r1mega.train}"' in (ROOT / "slurm" / "train.sbatch").read_text()
