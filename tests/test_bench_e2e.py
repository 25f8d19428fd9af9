"""tools/bench_e2e_trl.py's mapping of r1mega's config onto TRL 1.16's GRPOConfig, both ways, on the CPU without
TRL (the GPU run checks the names against TRL itself); its --dry-run composes the SmolLM2 preset."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1mega.config import AlgoConfig, Config, ModelConfig

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_e2e_trl.py"
_spec = importlib.util.spec_from_file_location("bench_e2e_trl", TOOL)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
e2e_stages = sys.modules["e2e_stages"]  # the job's stage commands (tools/e2e_stages.py, imported by the tool)


needs_hf_path = pytest.mark.skipif(
    "hf_path" not in {f.name for f in dataclasses.fields(ModelConfig)},
    reason="model.hf_path arrives with the HF-loading branch (h2); the preset sets it",
)


def _cfg(**algo) -> Config:
    cfg = Config(algo=AlgoConfig(group_size=8, beta=0.001, eps_low=0.2, eps_high=0.28, **algo))
    cfg.rollout.prompts_per_step, cfg.rollout.sampling.max_new_tokens, cfg.rollout.sampling.top_p = 32, 256, 0.95
    cfg.train.micro_batch_size, cfg.train.steps, cfg.train.precision = 64, 200, "bf16"
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-6, 10
    return cfg


def test_mapping_both_ways():
    cfg = _cfg()
    kw = bench.check_mapping(cfg)  # asserts every name is a TRL 1.16 field and TRL -> r1mega gives cfg back
    assert kw["num_generations"] == 8 and kw["max_completion_length"] == 256 and kw["beta"] == 0.001
    assert (kw["epsilon"], kw["epsilon_high"], kw["loss_type"], kw["scale_rewards"]) == (0.2, 0.28, "grpo", "group")
    # one generation of 32 x 8 completions per optimizer step, trained as 4 micro-batches of 64
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (64, 4)
    assert kw["generation_batch_size"] == 256 and kw["num_iterations"] == 1
    assert kw["gradient_checkpointing"] is False and kw["bf16"] is True and kw["use_vllm"] is False
    assert kw["lr_scheduler_type"] == "constant_with_warmup" and kw["adam_beta2"] == cfg.optim.adam_beta2
    dr = bench.check_mapping(_cfg(loss_agg="seq-mean-token-sum-norm", adv_std_norm=False))
    assert (dr["loss_type"], dr["scale_rewards"]) == ("dr_grpo", "none")
    assert bench.check_mapping(_cfg(loss_agg="token-mean"))["loss_type"] == "dapo"


def test_mapping_refuses_what_trl_cannot_mirror(monkeypatch):
    with pytest.raises(ValueError, match="one optimizer step per rollout"):
        bench.trl_kwargs(_cfg(num_minibatches=2), "/tmp/x")
    cfg = _cfg()
    cfg.train.micro_batch_size = 96
    with pytest.raises(ValueError, match="must divide"):
        bench.trl_kwargs(cfg, "/tmp/x")
    monkeypatch.setattr(bench, "TRL_FIELDS", bench.TRL_FIELDS - {"epsilon_high"})
    with pytest.raises(AssertionError, match="epsilon_high"):
        bench.check_mapping(_cfg())


def test_a_wrong_inverse_is_caught(monkeypatch):
    """The round trip compares values: a mapping that drops a setting (here the KL coefficient) fails."""
    forward = bench.trl_kwargs
    monkeypatch.setattr(bench, "trl_kwargs", lambda cfg, out: {**forward(cfg, out), "beta": 0.0})
    with pytest.raises(AssertionError, match="algo.beta"):
        bench.check_mapping(_cfg())


@needs_hf_path
def test_dry_run_composes_the_preset_and_prints_the_stages(tmp_path):
    env = {**os.environ, "SMOLLM2_HF": str(tmp_path / "smollm2"), "GSM8K_DIR": "/work/shared/data/gsm8k"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, _, stages = proc.stdout.partition("\ncold: ")
    kw = json.loads(head)["trl_grpo_config"]
    assert (kw["num_generations"], kw["max_completion_length"], kw["learning_rate"]) == (8, 256, 3e-6)
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 32 * 8
    for name in ("r1mega:", "trl:", "eval_cold:", "eval_trl_final:", "r1mega_fp8:"):
        assert f"\n{name} " in "\n" + stages
    assert f"train.export_hf_dir={tmp_path / 'cold'}" in stages and "+preset=smollm2_gsm8k" in stages
    lines = {line.split(": ", 1)[0]: line for line in ("cold: " + stages).splitlines()}
    for name in ("r1mega", "trl"):  # the preset's 20 minutes, capped inside the 570 s stage: (570 - 150) s
        assert lines[name].endswith("train.max_minutes=7.00"), lines[name]
    assert "max_minutes" not in lines["cold"] + lines["eval_cold"] and "rollout=megatron" in lines["cold"]
    assert "eval.also_greedy=true" in lines["eval_r1mega_final"] and "train.fp8=blockwise" in lines["r1mega_fp8"]
    assert f"eval.models=[eval_cold:{tmp_path / 'cold'}]" in lines["eval"]  # nothing trained yet: the cold start
    assert e2e_stages.EVAL_GRAPHS in lines["eval"] and e2e_stages.TRAIN_GRAPHS in lines["r1mega"] + lines["r1mega_fp8"]
    assert "preflight: every r1mega stage composes" in proc.stdout


def test_eval_stage_takes_the_checkpoints_made_so_far(tmp_path):
    """One r1mega-eval process for every HF folder that exists when the stage starts, each into eval_<ck>/."""
    for ck in ("cold", "trl_final"):
        (tmp_path / ck).mkdir()
        (tmp_path / ck / "config.json").write_text("{}")
    (tmp_path / "r1mega_final").mkdir()  # an export that did not finish (no config.json) is left out
    cmd = bench.r1mega_cmds(tmp_path, ["logging.progress=false"])["eval"]
    models = next(a for a in cmd if a.startswith("eval.models="))
    assert models == f"eval.models=[eval_cold:{tmp_path / 'cold'},eval_trl_final:{tmp_path / 'trl_final'}]"
    assert f"eval.output={tmp_path / 'eval.json'}" in cmd and cmd[-1] == "logging.progress=false"
    (tmp_path / "eval_cold").mkdir()
    (tmp_path / "eval_cold" / "eval.json").write_text("{}")  # evaluated by an earlier eval stage of the job
    models = next(a for a in bench.r1mega_cmds(tmp_path, [])["eval"] if a.startswith("eval.models="))
    assert models == f"eval.models=[eval_trl_final:{tmp_path / 'trl_final'}]"
    (tmp_path / "eval_trl_final").mkdir()
    (tmp_path / "eval_trl_final" / "eval.json").write_text("{}")
    assert "eval" not in bench.r1mega_cmds(tmp_path, [])  # nothing new: no second evaluation of the same folders
    cmds = bench.r1mega_cmds(tmp_path, [], rl_minutes=5.0, fp8_minutes=1.5)
    assert cmds["r1mega"][-1] == "train.max_minutes=5.00" and cmds["r1mega_fp8"][-1] == "train.max_minutes=1.50"


def test_job_runs_stages_in_the_given_order_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    """The background job's loop: stages in --stage order (eval twice: keys eval, eval_2), a failed stage recorded
    and skipped, the results archive written after each, the exit status naming the failures."""
    ran = []

    def fake_stage(name, cmd, out, timeout):
        ran.append(name)
        if name == "trl":
            raise SystemExit("trl failed (rc 1)")
        return {"wall_s": 1.0, "peak_gpu_mib": 0, "rc": 0}

    monkeypatch.setattr(bench, "run_stage", fake_stage)
    monkeypatch.setattr(bench, "check_mapping", lambda cfg: None)
    monkeypatch.setattr(bench, "preflight", lambda cmds, wanted: None)
    monkeypatch.setattr(bench, "compose", lambda overrides: SimpleNamespace(train=SimpleNamespace(max_minutes=2.0)))
    stages = "cold,r1mega,eval,trl,eval"
    argv = ["bench", "--out", str(tmp_path), "--results", str(tmp_path / "back"), "--stage", stages]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="failed stages: trl"):
        bench.main()
    assert ran == ["cold", "r1mega", "eval", "trl", "eval_2"]
    info = json.loads((tmp_path / "stages.json").read_text())
    assert set(info) == {"cold", "r1mega", "eval", "trl", "eval_2"} and "failed" in info["trl"]
    assert (tmp_path / "back" / "e2e_results.tgz").is_file()


def test_a_failed_rl_stage_is_exported_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """An RL stage that dies after a checkpoint (2026-12-06b: SGLang's resume at step 26) is exported from it by
    r1mega-export with the stage's own overrides, and the next eval evaluates that folder; no checkpoint, no export."""
    ran: dict[str, list[str]] = {}

    def fake_stage(name, cmd, out, timeout):
        ran[name] = cmd
        if name == "r1mega":
            ckpts = tmp_path / "r1mega" / "checkpoints"
            (ckpts / "step_000024").mkdir(parents=True)
            (ckpts / "latest").write_text("step_000024")
            raise SystemExit("r1mega failed (rc -9)")
        if name == "r1mega_fp8":
            raise SystemExit("r1mega_fp8 failed (rc 1)")  # before any checkpoint
        if name == "eval":  # the cold start evaluated
            (tmp_path / "eval_cold").mkdir()
            (tmp_path / "eval_cold" / "eval.json").write_text("{}")
        if name in ("cold", "r1mega_export"):
            folder = tmp_path / ("cold" if name == "cold" else "r1mega_final")
            folder.mkdir()
            (folder / "config.json").write_text("{}")
        return {"wall_s": 1.0, "peak_gpu_mib": 0, "rc": 0}

    monkeypatch.setattr(bench, "run_stage", fake_stage)
    monkeypatch.setattr(bench, "check_mapping", lambda cfg: None)
    monkeypatch.setattr(bench, "preflight", lambda cmds, wanted: None)
    monkeypatch.setattr(bench, "compose", lambda overrides: SimpleNamespace(train=SimpleNamespace(max_minutes=2.0)))
    argv = ["bench", "--out", str(tmp_path), "--stage", "cold,eval,r1mega,r1mega_fp8,eval"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="failed stages: r1mega, r1mega_fp8"):
        bench.main()
    assert list(ran) == ["cold", "eval", "r1mega", "r1mega_export", "r1mega_fp8", "eval_2"]
    export = ran["r1mega_export"]
    assert export[1:4] == ["-m", "r1mega.model.hf_io", str(tmp_path / "r1mega_final")]
    assert export[4:-1] == ran["r1mega"][3:]  # the stage's own overrides: the same model
    assert export[-1] == f"model.checkpoint={tmp_path / 'r1mega' / 'checkpoints' / 'step_000024'}"
    models = next(a for a in ran["eval_2"] if a.startswith("eval.models="))
    assert models == f"eval.models=[eval_r1mega_final:{tmp_path / 'r1mega_final'}]"
    info = json.loads((tmp_path / "stages.json").read_text())
    assert "failed" in info["r1mega"] and info["r1mega_export"]["rc"] == 0 and "r1mega_fp8_export" not in info
    e2e_stages.preflight({"r1mega_export": export}, ["r1mega_export"])  # r1mega-export composes its overrides


def test_preflight_refuses_an_override_one_stage_cannot_take(tmp_path, monkeypatch):
    """Every r1mega stage's config is composed before the first stage starts: rollout.mem_fraction is an SGLang key,
    and the cold stage runs rollout=megatron (the 2026-12-06 job lost its first start to exactly this)."""
    monkeypatch.setenv("SMOLLM2_HF", str(tmp_path / "smollm2"))
    monkeypatch.setenv("GSM8K_DIR", "/work/shared/data/gsm8k")
    stages = ["cold", "r1mega", "eval", "trl"]
    e2e_stages.preflight(bench.r1mega_cmds(tmp_path, ["train.max_minutes=4"]), stages)  # composes: no error
    with pytest.raises(SystemExit) as err:
        e2e_stages.preflight(bench.r1mega_cmds(tmp_path, ["rollout.mem_fraction=0.4"]), stages)
    msg = str(err.value)
    assert "stage cold (r1mega.train)" in msg and "mem_fraction" in msg
    assert "stage r1mega " not in msg and "stage eval " not in msg  # the SGLang stages take it
    with pytest.raises(SystemExit, match=r"stage eval \(r1mega.eval.cli\).*eval.nonsense"):
        e2e_stages.preflight(bench.r1mega_cmds(tmp_path, ["+eval.nonsense=1"]), ["eval"])


def test_rl_minutes_caps_inside_the_stage_timeout():
    assert bench.rl_minutes(20.0, 570) == pytest.approx(7.0)
    assert bench.rl_minutes(3.0, 570) == 3.0  # a shorter config limit stands
    assert bench.rl_minutes(0.0, 570) == pytest.approx(7.0)  # none: the cap
    assert bench.rl_minutes(20.0, 100) == 1.0  # never below a minute


def _eval_results(correct: list[list[bool]], greedy: bool):
    """An r1mega-eval result of GSM8K (per problem: each sample's correctness), built by r1mega/eval/results.py."""
    from r1mega.eval.results import EvalResults, ProblemResult, SampleResult, SetResult, summarize

    problems = [ProblemResult(i, f"q{i}", "1", [SampleResult("1" if c else "2", c, True, 50 + 10 * c, True)
                                               for c in flags], [], None, any(flags))
                for i, flags in enumerate(correct)]  # fmt: skip
    res = EvalResults({"greedy": greedy, "k": len(correct[0])}, {"gsm8k": SetResult("gsm8k", problems)})
    res.sets["gsm8k"].metrics = summarize(problems, [1, len(correct[0])])
    return res


def test_report_table_and_curves_from_run_logs(tmp_path):
    """The report reads both sides' metrics.jsonl and r1mega-eval's eval.json / eval_greedy.json of each checkpoint,
    writes the table (accuracy differences and their z against fp64 formulas) and the PNG."""
    import math
    import statistics

    from r1mega.eval.results import save_results

    for side, extra in (("r1mega", {"rollout/logp_diff_mean": 0.01}), ("trl", {})):
        (tmp_path / side).mkdir()
        rows = [{"step": i + 1, "time/step": 2.0 + i, "time/generation": 1.0, "time/logprobs": 0.2,
                 "time/training": 0.5, "time/weight_update": 0.1, "time/reward": 0.1, "perf/tokens_per_s": 1000.0,
                 "reward/mean": 0.1 * i, "reward/accuracy": 0.05 * i, "response/length_mean": 90.0,
                 "train/kl": 1e-3 * i, **extra} for i in range(3)]  # fmt: skip
        (tmp_path / side / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = 20  # greedy: cold right on problems 0-1, r1mega on 0-4; k=8: cold i % 3 == 0 of 8, r1mega one more
    greedy = {"cold": [[i < 2] for i in range(n)], "r1mega_final": [[i < 5] for i in range(n)]}
    sampled = {"cold": [[j < i % 3 for j in range(8)] for i in range(n)],
               "r1mega_final": [[j <= i % 3 for j in range(8)] for i in range(n)]}  # fmt: skip
    for ck in greedy:
        save_results(_eval_results(greedy[ck], True), tmp_path / f"eval_{ck}" / "eval_greedy.json")
        save_results(_eval_results(sampled[ck], False), tmp_path / f"eval_{ck}" / "eval.json")
    table = bench.report(tmp_path, {"r1mega": {"peak_gpu_mib": 2048, "wall_s": 60}})
    assert "| median step (s) | 3.00 | 3.00 |" in table and "| peak GPU memory (nvidia-smi, GiB) | 2.0 | 0.0 |" in table
    assert "| steps / RL minutes / stage wall (s) | 3 / 0.15 / 60 |" in table  # 2 + 3 + 4 s
    se = lambda xs: statistics.stdev(xs) / math.sqrt(len(xs))  # noqa: E731
    g0, g1 = [float(i < 2) for i in range(n)], [float(i < 5) for i in range(n)]
    k0, k1 = [(i % 3) / 8 for i in range(n)], [(i % 3 + 1) / 8 for i in range(n)]
    z_g = (statistics.fmean(g1) - statistics.fmean(g0)) / math.hypot(se(g1), se(g0))
    paired_g = statistics.fmean([b - a for a, b in zip(g0, g1)]) / se([b - a for a, b in zip(g0, g1)])
    cold = f"| cold start | 10.00 +- {100 * se(g0):.2f} | {100 * statistics.fmean(k0):.2f} +- {100 * se(k0):.2f} |"
    assert cold in table
    row = next(line for line in table.splitlines() if line.startswith("| r1mega after"))
    assert f"| +15.00 (z {z_g:.1f}, paired {paired_g:.1f}) |" in row, row
    assert "| +12.50 (z " in row and "paired inf" in row  # every problem gains exactly 1/8: zero spread
    assert f"| {100 * statistics.fmean(k1):.2f} +- {100 * se(k1):.2f} |" in row
    assert "| pass@1 gain per RL GPU-minute (points) | 83.333 | nan |" in table  # 12.5 points in 0.15 min
    assert table.splitlines()[-1] == "| TRL after | - | - | - | - | - / - | - | - | - |"  # not run
    assert (tmp_path / "e2e_table.md").read_text().strip() == table
    assert (tmp_path / "e2e_curves.png").stat().st_size > 10_000
    import tarfile

    archive = bench.copy_results(tmp_path, tmp_path / "back")  # what a device command brings back: one file
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["e2e_results.tgz"]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    got = tmp_path / "unpacked"
    assert (got / "trl" / "metrics.jsonl").read_text() == (tmp_path / "trl" / "metrics.jsonl").read_text()
    assert (got / "eval_cold" / "eval_greedy.json").is_file() and (got / "eval_cold" / "eval.json").is_file()
    assert bench.report(got, {"r1mega": {"peak_gpu_mib": 2048, "wall_s": 60}}) == table  # the report, here


@needs_hf_path
def test_trl_stage_runs_on_cpu_from_a_tiny_llama(tmp_path):
    """TRL's side end to end on the CPU (where TRL + datasets are importable): the same prompts, r1mega's rewards,
    an optimizer step of 2 prompts x 2 completions, stopped after it by train.max_minutes (of 3 steps), the saved
    model reloads."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM

    from tests.chatml_tokenizer import build_tiny_llama

    build_tiny_llama(tmp_path / "cold")
    extra = ["train.precision=fp32", "train.steps=3", "train.max_minutes=0.0001", "rollout.prompts_per_step=2",
             "algo.group_size=2", "rollout.sampling.max_new_tokens=8", "train.micro_batch_size=4",
             "reward.num_workers=1", "sft.num_examples=64", "optim.warmup_steps=0"]  # fmt: skip
    env = {**os.environ, "GSM8K_DIR": "/work/shared/data/gsm8k", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(TOOL), "--trl-child", "--out", str(tmp_path), "--", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "trl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert rows[0]["time/generation"] > 0 and rows[0]["time/reward"] > 0 and rows[0]["time/training"] > 0
    assert 0.0 <= rows[0]["reward/accuracy"] <= 1.0 and rows[0]["response/length_mean"] <= 8
    AutoModelForCausalLM.from_pretrained(tmp_path / "trl_final")


def test_report_keeps_an_evaluation_the_machine_did_not_let_finish(tmp_path):
    """A checkpoint whose evaluation was cut off has only eval[_greedy]_progress.json (r1mega/eval/runner.py writes
    it after every chunk): its row shows the running pass@1 +- se marked partial, and the difference to the cold
    start with the unpaired z (no per-problem results to pair)."""
    import math

    from r1mega.eval.chunks import Sample
    from r1mega.eval.results import save_results
    from r1mega.eval.runner import write_progress

    n = 20
    save_results(_eval_results([[i < 2] for i in range(n)], True), tmp_path / "eval_cold" / "eval_greedy.json")
    flags = [i < 6 for i in range(n // 2)]  # the first of two chunks: 10 problems, 6 right
    samples = [Sample("1" if c else "2", float(c), 1.0, 40, True, None) for c in flags]
    write_progress(tmp_path / "eval_r1mega_final" / "eval_greedy_progress.json", ["gsm8k"] * len(samples), samples,
                   chunks=1, of=2, wall_s=1.0, gen_s=1.0)  # fmt: skip
    table = bench.report(tmp_path, {})
    row = next(line for line in table.splitlines() if line.startswith("| r1mega after"))
    se_after = math.sqrt(0.6 * 0.4 / (10 - 1))  # sample std / sqrt(n) of ten 0/1 outcomes
    se_cold = math.sqrt(0.1 * 0.9 * n / (n - 1) / n)
    assert row.startswith(f"| r1mega after (partial: greedy 1/2 chunks) | 60.00 +- {100 * se_after:.2f} |"), row
    assert f"| +50.00 (z {0.5 / math.hypot(se_after, se_cold):.1f}, partial) |" in row, row
    assert "| cold start | 10.00 +- " in table
