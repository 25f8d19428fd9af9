"""SGLangRolloutEngine against a fake ``sglang`` module (CPU): the request / response mapping, the bucketed
weight push, and the release / resume ordering. The fake enforces what real SGLang needs: weights resident
while they are written, everything resident while generating, weights pushed after every weight resume
(the memory saver drops their contents), MLA ``q_a_proj`` + ``kv_a_proj_with_mqa`` in one call. One 2-rank
run (TP=2, gloo) checks that only the first TP rank drives SGLang and the other receives its rollouts.

The real engine on a GPU is not exercised here (see the module docstring of r1mega/rollout/sglang_engine.py).
"""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest
import torch

from r1mega.config import Config, SGLangRolloutConfig
from r1mega.data.tokenizer import CharTokenizer
from r1mega.model.hf_export import export_hf, hf_config_from_model_config
from r1mega.rollout.base import HFWeights, SamplingParams
from tests.launch import run_ranks

TAGS = {"kv_cache", "weights", "cuda_graph"}


class FakeEngine:
    """Records calls; raises where SGLang would fail or silently misbehave."""

    instances: list[FakeEngine] = []
    spawn_scheduler = False

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, object]] = [("init", None)]
        self.offloaded: set[str] = set()
        self.loaded: dict[str, torch.Tensor] = {}
        self.buckets: list[list[str]] = []
        self.config = json.loads((Path(kwargs["model_path"]) / "config.json").read_text())
        self.responder = default_responder
        self.drop: set[str] = set()  # names this fake SGLang has no parameter for
        if kwargs.get("load_format", "auto") != "dummy":  # a standalone engine reads its weights from model_path
            self.loaded["<from disk>"] = torch.zeros(1)
        if FakeEngine.spawn_scheduler:  # a stand-in for SGLang's scheduler process, started by the engine
            self.scheduler = subprocess.Popen(["sleep", "120"])
        FakeEngine.instances.append(self)

    def release_memory_occupation(self, tags=None):
        tags = list(tags or TAGS)
        assert not self.offloaded & set(tags), f"released twice: {tags}"
        self.offloaded |= set(tags)
        if "weights" in tags:
            self.loaded.clear()  # torch_memory_saver keeps no contents
        self.calls.append(("release", tuple(sorted(tags))))

    def resume_memory_occupation(self, tags=None):
        for t in tags or TAGS:
            self.offloaded.remove(t)  # KeyError on a tag that was not released, as SGLang
        self.calls.append(("resume", tuple(sorted(tags or TAGS))))

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        assert "weights" not in self.offloaded, "weights written while released"
        if load_format == "flattened_bucket":  # one serialized {"flattened_tensor", "metadata"} per TP rank
            assert len(named_tensors) == self.kwargs["tp_size"], "one payload per SGLang TP rank"
            data = FakeSerializer.deserialize(named_tensors[0])
            named_tensors = FakeBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
            named_tensors = named_tensors.reconstruct_tensors()
            assert len({t.dtype for _, t in named_tensors}) == 1, "a flattened bucket holds one dtype"
        else:
            assert load_format is None, load_format
        names = [n for n, _ in named_tensors]
        names = [n for n in names if n not in self.drop]  # SGLang drops names it has no parameter for, silently
        for n in names:  # deepseek_weight_loader fuses these two within one load_weights call
            if n.endswith("q_a_proj.weight"):
                assert n.replace("q_a_proj", "kv_a_proj_with_mqa") in names, n
        self.loaded.update({n: t.clone() for n, t in named_tensors if n in names})
        self.buckets.append(names)
        self.calls.append(("update", (len(names), flush_cache)))

    def flush_cache(self):
        self.calls.append(("flush", None))

    def get_weights_by_name(self, name, truncate_size=100):
        """As sglang 0.5.17's LlamaForCausalLM: the first rows as float lists, None for an unknown name."""
        assert self.config["architectures"][0] in ("LlamaForCausalLM",), "only some SGLang models implement it"
        self.calls.append(("get_weights", name))
        t = self.loaded.get(name)
        return None if t is None else t.float()[:truncate_size].tolist()

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, return_routed_experts=False, **kw):
        assert not self.offloaded, f"generate while {self.offloaded} released"
        assert self.loaded, "generate on dummy weights"
        starts = kw.pop("logprob_start_len", None)  # per request, as SGLang's Engine.generate takes it
        assert not kw
        assert not return_routed_experts or self.kwargs.get("enable_return_routed_experts"), "server flag missing"
        self.calls.append(("generate", len(input_ids)))
        self.last_request = (input_ids, sampling_params)
        outs = [self.responder(i, ids, sp) for i, (ids, sp) in enumerate(zip(input_ids, sampling_params))]
        if not return_logprob:  # as SGLang: no log-prob entries in meta_info
            assert starts is None
            for o in outs:
                o["meta_info"].pop("output_token_logprobs", None)
        for ids, o, k in zip(input_ids, outs, starts or []):  # as SGLang: from k on, the first value None
            o["meta_info"]["input_token_logprobs"] = [
                (None if j == k else -0.01 * j, ids[j], None) for j in range(k, len(ids))
            ]
        if return_routed_experts:  # int32 [seq_len - 1, num_hidden_layers, topk], base64 (skip_tokenizer_init)
            layers, topk = self.config["num_hidden_layers"], self.config["num_experts_per_tok"]
            for ids, o in zip(input_ids, outs):
                n = len(ids) + len(o["output_ids"]) - 1
                r = (torch.arange(n * layers * topk, dtype=torch.int32) % 4).reshape(n, layers, topk)
                o["meta_info"]["routed_experts"] = base64.b64encode(r.numpy().tobytes()).decode()
        return outs

    def shutdown(self):
        """As sglang 0.5.17's Engine.shutdown: ends with kill_process_tree over *every* descendant of the caller."""
        self.calls.append(("shutdown", None))
        engine_module = sys.modules["sglang.srt.entrypoints.engine"]
        engine_module.kill_process_tree(os.getpid(), include_parent=False, wait_timeout=60)


EOS = CharTokenizer().eos_id


def default_responder(i, ids, sp):
    """Request i: i % 3 == 0 stops at EOS after 3 tokens, 1 runs to max_new_tokens, 2 stops with the EOS
    trimmed from output_ids but its log-prob reported (a layout some SGLang paths produce)."""
    n = sp["max_new_tokens"]
    if i % 3 == 1:
        out = [(7 + i + k) % 20 + 5 for k in range(n)]
        reason = {"type": "length", "length": n}
    else:
        out = [5 + i, 6 + i, EOS]
        reason = {"type": "stop", "matched": EOS}
    lps = [(-0.1 * (k + 1) - i, t, None) for k, t in enumerate(out)]
    if i % 3 == 2:
        out = out[:-1]
    return {"output_ids": out, "meta_info": {"output_token_logprobs": lps, "finish_reason": reason}}


class FakeBucket:
    """sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket's interface: one uint8 buffer + metadata."""

    def __init__(self, named_tensors=None, flattened_tensor=None, metadata=None):
        if named_tensors is not None:
            flat = [t.flatten().view(torch.uint8) for _, t in named_tensors]
            starts = [0]
            for f in flat:
                starts.append(starts[-1] + f.numel())
            metadata = [
                types.SimpleNamespace(name=n, shape=t.shape, dtype=t.dtype, start_idx=a, end_idx=b, numel=b - a)
                for (n, t), a, b in zip(named_tensors, starts, starts[1:])
            ]
            flattened_tensor = torch.cat(flat)
        self.flattened_tensor, self.metadata = flattened_tensor, metadata

    def get_flattened_tensor(self):
        return self.flattened_tensor

    def get_metadata(self):
        return self.metadata

    def reconstruct_tensors(self):
        return [
            (m.name, self.flattened_tensor[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape))
            for m in self.metadata
        ]


class FakeSerializer:
    """sglang.srt.utils.MultiprocessingSerializer (pickling here; CUDA IPC handles on a GPU)."""

    @staticmethod
    def serialize(obj, output_str=False):
        data = pickle.dumps(obj)
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def deserialize(data):
        return pickle.loads(base64.b64decode(data) if isinstance(data, str) else data)


def install_fake_sglang(monkeypatch: pytest.MonkeyPatch | None) -> None:
    """The fake ``sglang`` modules in sys.modules: for one test (monkeypatch restores what was there), or for the
    rest of the process (None: a spawned rank)."""
    FakeEngine.instances.clear()
    fakes = {
        "sglang": types.SimpleNamespace(Engine=FakeEngine, __version__="fake"),
        "sglang.srt.utils": types.SimpleNamespace(MultiprocessingSerializer=FakeSerializer),
        "sglang.srt.weight_sync.tensor_bucket": types.SimpleNamespace(FlattenedTensorBucket=FakeBucket),
        "sglang.srt.entrypoints.engine": types.SimpleNamespace(kill_process_tree=kill_every_descendant),
    }
    for name, module in fakes.items():
        if monkeypatch is None:
            sys.modules[name] = module
        else:
            monkeypatch.setitem(sys.modules, name, module)


def kill_every_descendant(parent_pid, include_parent=True, skip_pid=None, wait_timeout=None):
    """sglang.srt.utils.kill_process_tree as 0.5.17 writes it (the branches the engine takes)."""
    procs = psutil.Process(parent_pid).children(recursive=True)
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=wait_timeout)


def small_config(tp: int = 1, ep: int = 1) -> Config:
    """A DeepSeek-V3-style MLA MoE with a dense first layer (exports as DeepseekV3ForCausalLM)."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.max_position_embeddings = 3, 64, 128, 64
    m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size = 4, 32, 32
    m.first_k_dense_layers = 1
    m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank, m.qk_layernorm = True, 32, 32, True
    m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim = 16, 8, 16
    cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.etp = tp, ep, 1
    cfg.rollout = SGLangRolloutConfig(mem_fraction=0.4, max_batch_size=96)
    return cfg


def make_policy(cfg: Config, tok):
    from r1mega.model.builder import build_gpt_model

    model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, tok.vocab_size, torch.device("cpu"))
    return HFWeights(model, cfg.model, tok.vocab_size)


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rt = init_runtime(Config().parallel, seed=0, device="cpu")
    yield rt
    shutdown_runtime()
    torch.set_num_threads(threads)


@pytest.fixture
def setup(runtime, monkeypatch):
    install_fake_sglang(monkeypatch)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok, bucket_bytes=24 << 10)
    yield cfg, tok, policy, engine, FakeEngine.instances[-1]
    engine.shutdown()


def kinds(fake, start=0):
    return [c[0] for c in fake.calls[start:]]


def test_startup_writes_config_and_releases(setup):
    cfg, tok, policy, engine, fake = setup
    kw = fake.kwargs
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] and kw["enable_memory_saver"]
    assert (kw["attention_backend"], kw["sampling_backend"]) == ("triton", "pytorch")
    assert (kw["mem_fraction_static"], kw["tp_size"], kw["max_running_requests"]) == (0.4, 1, 96)
    want = hf_config_from_model_config(cfg.model, tok.vocab_size, dtype="float32", eos_token_id=tok.eos_id)
    assert fake.config == json.loads(json.dumps(want))
    assert fake.config["architectures"] == ["DeepseekV3ForCausalLM"] and fake.config["eos_token_id"] == EOS
    assert kinds(fake) == ["init", "release"] and fake.offloaded == TAGS  # the GPU is the trainer's until generate


def test_first_generate_pushes_weights_then_resumes(setup):
    cfg, tok, policy, engine, fake = setup
    engine.resume_memory()  # what the trainer does before generate
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    seq = kinds(fake, 2)
    assert seq[0] == "resume" and seq[-1] == "generate" and seq[-2] == "flush"
    assert set(seq[1:-2]) == {"update"} and len(seq[1:-2]) > 3, "expected several buckets"
    assert not any(c[1][1] for c in fake.calls if c[0] == "update"), "one flush_cache after the last bucket"
    whole = dict(export_hf(policy.model, cfg.model, tok.vocab_size))
    assert set(fake.loaded) == set(whole)
    torch.testing.assert_close(fake.loaded, whole)
    assert fake.loaded["model.embed_tokens.weight"].shape[0] == tok.vocab_size  # padded rows sliced off
    assert sum(len(b) for b in fake.buckets) == len(whole)


def test_trainer_cycle_release_update_resume(setup):
    """generate -> release -> (train) -> update_weights -> resume -> generate: one push, weights first."""
    cfg, tok, policy, engine, fake = setup
    params = SamplingParams(max_new_tokens=4)
    engine.resume_memory()
    engine.generate([[1, 2]], params)
    engine.release_memory()
    assert fake.offloaded == TAGS and not fake.loaded
    with torch.no_grad():
        policy.model.embedding.word_embeddings.weight.add_(1.0)  # "training"
    start = len(fake.calls)
    engine.update_weights(policy)
    assert fake.calls[start] == ("resume", ("weights",)) and fake.offloaded == {"kv_cache", "cuda_graph"}
    assert kinds(fake, start)[-1] == "flush"
    emb = policy.model.embedding.word_embeddings.weight[: tok.vocab_size]
    torch.testing.assert_close(fake.loaded["model.embed_tokens.weight"], emb)
    start = len(fake.calls)
    engine.resume_memory()
    engine.generate([[1, 2]], params)
    assert fake.calls[start:] == [("resume", ("cuda_graph", "kv_cache")), ("generate", 1)]  # no second push

    # an evaluate-style release without an update: the contents are gone, so generate pushes again
    engine.release_memory()
    engine.resume_memory()
    start = len(fake.calls)
    engine.generate([[1, 2]], params)
    assert "update" in kinds(fake, start) and kinds(fake, start)[-1] == "generate"
    engine.release_memory()
    engine.release_memory()  # idempotent: SGLang must not see a second release
    engine.resume_memory()
    engine.resume_memory()


def test_request_and_response_mapping(setup):
    cfg, tok, policy, engine, fake = setup
    engine.resume_memory()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [3, 3], [1]]
    rolls = engine.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, seed=11))
    ids, sps = fake.last_request
    assert ids == prompts
    sp = sps[0]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["max_new_tokens"]) == (0.7, 0.9, -1, 5)
    assert sp["stop_token_ids"] == [EOS]
    seeds = [s["sampling_seed"] for s in sps]
    assert len(set(seeds)) == len(seeds), "the G copies of a prompt must not share a seed"
    assert [r.prompt_ids for r in rolls] == prompts
    for i, r in enumerate(rolls):
        assert len(r.logprobs) == len(r.response_ids)
        if i % 3 == 1:
            assert not r.finished and len(r.response_ids) == 5 and EOS not in r.response_ids
        else:  # EOS returned, or trimmed and restored with its reported log-prob
            assert r.finished and r.response_ids == [5 + i, 6 + i, EOS]
        assert r.logprobs == pytest.approx([-0.1 * (k + 1) - i for k in range(len(r.response_ids))])

    again = engine.generate(prompts, SamplingParams(max_new_tokens=5, seed=11))
    assert [s["sampling_seed"] for s in fake.last_request[1]] == seeds and len(again) == len(prompts)
    engine.generate(prompts, SamplingParams(top_k=1, max_new_tokens=5))  # greedy, no seed
    assert fake.last_request[1][0]["top_k"] == 1 and "sampling_seed" not in fake.last_request[1][0]


def test_generation_without_log_probs(setup):
    """Evaluation asks for none (SamplingParams.logprobs=False): SGLang gets return_logprob=False and the rollouts
    carry NaN, with the same tokens and the same stop handling (a trimmed EOS restored from finish_reason)."""
    cfg, tok, policy, engine, fake = setup
    engine.resume_memory()
    prompts = [[1, 2, 3], [4, 5], [6]]
    want = engine.generate(prompts, SamplingParams(max_new_tokens=5, seed=3))
    got = engine.generate(prompts, SamplingParams(max_new_tokens=5, seed=3, logprobs=False))
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.finished for r in got] == [r.finished for r in want]
    assert all(len(r.logprobs) == len(r.response_ids) and all(math.isnan(x) for x in r.logprobs) for r in got)


def test_score_reads_the_prefill_log_probs_of_the_tail(setup):
    """score(): one prefill request per sequence, logprob_start_len one before the scored tail (SGLang's first value
    there is None), the tail's values in order; a misaligned reply raises."""
    cfg, tok, policy, engine, fake = setup
    engine.resume_memory()
    seqs, starts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10]], [3, 1, 0]
    got = engine.score(seqs, starts)
    ids, sps = fake.last_request
    assert ids == seqs and all(sp == {"temperature": 0.0, "max_new_tokens": 1} for sp in sps)
    assert got[0] == pytest.approx([-0.03, -0.04]) and got[1] == pytest.approx([-0.01, -0.02])
    assert math.isnan(got[2][0]) and got[2][1:] == pytest.approx([-0.01])  # position 0 has no log-prob
    fake.responder = lambda i, ids, sp: {"output_ids": [5], "meta_info": {"finish_reason": {"type": "length"}}}
    real = fake.generate
    fake.generate = lambda **kw: [{"meta_info": {"input_token_logprobs": [(-1.0, 99, None)]}}]
    with pytest.raises(RuntimeError, match="not aligned"):
        engine.score([[1, 2]], [1])
    fake.generate = real


def test_bad_responses_raise(setup):
    cfg, tok, policy, engine, fake = setup
    engine.resume_memory()
    fake.responder = lambda i, ids, sp: {
        "output_ids": [5, 6],
        "meta_info": {"output_token_logprobs": [(-1.0, 6, None), (-1.0, 5, None)], "finish_reason": None},
    }
    with pytest.raises(RuntimeError, match="not aligned"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    fake.responder = lambda i, ids, sp: {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort"}}}
    with pytest.raises(RuntimeError, match="aborted"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    fake.responder = lambda i, ids, sp: {"output_ids": [5, EOS], "meta_info": {"finish_reason": {"type": "length"}}}
    r = engine.generate([[1]], SamplingParams(max_new_tokens=2))[0]
    assert r.finished and r.response_ids == [5, EOS] and all(math.isnan(x) for x in r.logprobs)


def test_shutdown_and_layout_checks(setup):
    cfg, tok, policy, engine, fake = setup
    model_dir = Path(fake.kwargs["model_path"])
    engine.shutdown()
    assert fake.calls[-1] == ("shutdown", None) and not model_dir.exists()
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    bad = small_config()
    bad.parallel.pp = 2
    with pytest.raises(ValueError, match="pp=1"):
        SGLangRolloutEngine(bad, policy, tok)


def test_shutdown_kills_only_the_engines_processes(runtime, monkeypatch):
    """SGLang's Engine.shutdown kills every descendant of the trainer (kill_process_tree(os.getpid())): it took the
    wandb service with it on the H200 (the run never closed) and the reward workers. Ours confines it to the
    processes SGLang started, before and after which the trainer's own children live on."""
    install_fake_sglang(monkeypatch)
    monkeypatch.setattr(FakeEngine, "spawn_scheduler", True)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    before = subprocess.Popen(["sleep", "120"])  # e.g. wandb's service
    try:
        engine = SGLangRolloutEngine(cfg, policy, tok)
        scheduler = FakeEngine.instances[-1].scheduler
        after = subprocess.Popen(["sleep", "120"])  # e.g. a reward worker started on the first batch
        try:
            engine.shutdown()
            assert not psutil.pid_exists(scheduler.pid)  # `sleep 120` killed and reaped (by kill_trees' wait)
            assert before.poll() is None and after.poll() is None
        finally:
            after.kill()
    finally:
        before.kill()


def test_build_engine_picks_sglang(setup, monkeypatch):
    from r1mega.rollout import build_rollout_engine
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok, policy, _, _ = setup
    engine = build_rollout_engine(cfg, policy, tok)
    assert isinstance(engine, SGLangRolloutEngine)
    engine.shutdown()


# ------------------------------------------------------------------------- TP=2 on 2 CPU ranks


def test_tp2_owner_drives_sglang_and_broadcasts(tmp_path):
    run_ranks(__file__, [str(tmp_path)], nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["engines"] == 1 and r1["engines"] == 0  # one SGLang engine per TP group, on its first rank
    assert r0["rollouts"] == r1["rollouts"] and len(r0["rollouts"]) == 3
    assert r0["tp_size"] == 2 and r0["pushed"] == r0["expected"]  # whole (TP-gathered) tensors


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    torch.set_num_threads(1)
    install_fake_sglang(None)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(tp=2), CharTokenizer()
    init_runtime(cfg.parallel, seed=0, device="cpu")
    policy = make_policy(cfg, tok)
    engine = SGLangRolloutEngine(cfg, policy, tok, bucket_bytes=32 << 10)
    engine.resume_memory()
    rolls = engine.generate([[1, 2], [3], [4, 5, 6]], SamplingParams(max_new_tokens=4, seed=3))
    expected = {n: list(t.shape) for n, t in export_hf(policy.model, cfg.model, tok.vocab_size)}
    fake = FakeEngine.instances[0] if FakeEngine.instances else None
    result = {
        "engines": len(FakeEngine.instances),
        "rollouts": [[r.prompt_ids, r.response_ids, r.finished] for r in rolls],
        "tp_size": fake.kwargs["tp_size"] if fake else None,
        "pushed": {n: list(t.shape) for n, t in fake.loaded.items()} if fake else None,
        "expected": expected,
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    engine.shutdown()
    shutdown_runtime()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _worker(Path(sys.argv[1]))
