"""HF checkpoints -> megatron (r1mega.model.hf_load) for every family: the loaded model computes transformers'
logits, the export of the loaded model is the checkpoint bit for bit (and reloads in transformers), loading is
bounded in host memory, and bad checkpoints fail naming the file and the tensor.

Tiny random checkpoints (tests/hf_models.py; vocab 100, padded to 128): Llama (tied embeddings, 3 shards),
Qwen2 (q/k/v biases), Qwen3 (q/k norms, head dim 32 != 64 / 4), Qwen3-MoE (a leading dense layer),
DeepSeek-V3 (MLA with q_lora, shared expert, sigmoid router + e_score_correction_bias, group-limited routing,
a dense layer), DeepSeek-V2 shaped like V2-Lite (no q_lora, softmax router, 2 shared experts). Multi-rank
layouts (TP=2 for all, EP=2 and PP=2 for Qwen3-MoE and DeepSeek-V3) run in tests/hf_load_worker.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from r1mega.config import ModelConfig, ParallelConfig, TrainConfig
from tests.hf_models import FAMILIES, VOCAB, hf_logits, hf_model, megatron_logits, tokens

transformers = pytest.importorskip("transformers")
ATOL = 2e-5  # logits are O(1) (init std 0.1): a wrong layout shows up as O(0.1)


def load(path: Path, **over):
    from r1mega.model.builder import build_gpt_model
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config

    m = resolve_model_config(ModelConfig(hf_path=str(path), **over))
    gpt = build_gpt_model(m, ParallelConfig(), TrainConfig(), m.vocab_size, torch.device("cpu")).eval()
    report = load_hf_weights(gpt, m)
    return gpt, m, report


@pytest.mark.parametrize("name", FAMILIES)
def test_loaded_model_gives_transformers_logits(runtime, tiny_hf, name):
    gpt, m, _ = load(tiny_hf[name])
    toks = tokens()
    ours = megatron_logits(gpt, toks)
    assert ours.shape[-1] == 128
    theirs = hf_logits(tiny_hf[name], toks)
    assert theirs.abs().max() > 1.0, "degenerate test: logits too small to tell layouts apart"
    err = float((ours[..., :VOCAB] - theirs).abs().max())
    print(f"{name} TP=1: max |logit diff| {err:.2e}")
    assert err < ATOL
    assert float(ours[..., VOCAB:].abs().max()) == 0.0  # padded vocab rows are zero


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_bit_exact_and_reloads(runtime, tiny_hf, tmp_path, name):
    from safetensors import safe_open

    from r1mega.model.hf_io import save_hf_folder

    gpt, m, _ = load(tiny_hf[name])
    src = tiny_hf[name]
    want = {}
    for f in src.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            want.update({k: h.get_tensor(k) for k in h.keys()})
    out = save_hf_folder(gpt, m, m.vocab_size, tmp_path / "out", dtype=torch.float32, shard_bytes=40_000)
    got = {}
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model = hf_model(out)  # transformers loads the exported folder as is
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(toks).logits, hf_logits(src, toks), atol=0, rtol=0)


def test_loading_is_bounded_in_host_memory(runtime, tmp_path):
    """A 3-shard checkpoint ~20x its largest tensor: the load may add at most one tensor (+ slack) to the RSS."""
    from tests.hf_models import save_tiny

    path = save_tiny("llama", tmp_path / "wide", shards=4, hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    _, _, r = load(path)
    margin = 4 << 20
    mib = {k: v / 2**20 for k, v in dict(total=total, largest=r.largest_hf_bytes, extra=r.extra_peak).items()}
    print(f"checkpoint {mib['total']:.1f} MiB in 4 shards, largest tensor {mib['largest']:.2f} MiB, the load added "
          f"{mib['extra']:.2f} MiB to the peak RSS")  # fmt: skip
    assert total > 3 * (r.largest_hf_bytes + margin), (
        "degenerate test: the checkpoint is not much bigger than the bound"
    )
    assert r.extra_peak <= r.largest_hf_bytes + margin


# ------------------------------------------------------------------------------------------- errors


def _broken(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_bad_checkpoints_name_the_file_and_tensor(runtime, tiny_hf, tmp_path):
    src = tiny_hf["qwen3"]
    k = "model.layers.1.self_attn.k_proj.weight"
    missing = _broken(src, tmp_path / "missing", lambda t: t.pop(k))
    with pytest.raises(ValueError, match=rf"tensor '{k}' is missing .*model.safetensors"):
        load(missing)
    extra = _broken(src, tmp_path / "extra", lambda t: t.update({"model.layers.1.mlp.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"have no place.*'model.layers.1.mlp.bias' \(model.safetensors\)"):
        load(extra)
    shaped = _broken(src, tmp_path / "shape", lambda t: t.update({k: t[k][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{k}' has shape \[64, 63\].*expects \[64, 64\]"):
        load(shaped)
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                  "architectures": ["MixtralForCausalLM"]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"unsupported architecture 'MixtralForCausalLM'.*LlamaForCausalLM"):
        load(arch)


def test_training_knobs_stay_the_users(tiny_hf):
    from r1mega.model.hf_load import resolve_model_config

    m = resolve_model_config(ModelConfig(hf_path=str(tiny_hf["qwen3_moe"]), moe_token_dispatcher_type="allgather"))
    assert (m.num_experts, m.moe_ffn_hidden_size, m.first_k_dense_layers) == (4, 32, 1)
    assert m.moe_token_dispatcher_type == "allgather" and m.tokenizer == str(tiny_hf["qwen3_moe"])
    assert dataclasses.replace(m, name="x").vocab_size == VOCAB


# ------------------------------------------------------------------- TP=2, EP=2, PP=2 on 2 CPU ranks

WORKER = Path(__file__).with_name("hf_load_worker.py")
MOE = ("qwen3_moe", "deepseek_v3")
LAYOUT_CASES = {"tp2": FAMILIES, "ep2": MOE, "pp2": MOE}


@pytest.fixture(scope="module")
def layouts(tiny_hf, tmp_path_factory):
    """One 2-rank launch per layout, each loading (and exporting) all its checkpoints."""
    from tests.launch import run_ranks

    out = tmp_path_factory.mktemp("layouts")
    for layout, names in LAYOUT_CASES.items():
        specs = [f"{n}={tiny_hf[n]}" for n in names]
        run_ranks(WORKER, ["--layout", layout, "--out", str(out / layout), *specs], nproc=2)
    return out


@pytest.mark.parametrize("layout,name", [(la, n) for la, names in LAYOUT_CASES.items() for n in names])
def test_parallel_layout_loads_the_same_model(layouts, tiny_hf, layout, name):
    """Each rank read only its slices (its heads / query groups / FFN rows / vocab rows / experts / layers):
    the logits are transformers', and the export gathered under the same layout is the checkpoint bit for bit."""
    from safetensors.torch import load_file

    res = layouts / layout / name
    ours = torch.load(res / "logits.pt")
    err = float((ours - hf_logits(tiny_hf[name], tokens())).abs().max())
    print(f"{name} {layout}: max |logit diff| {err:.2e}")
    assert err < ATOL
    want, got = {}, {}
    for f in tiny_hf[name].glob("*.safetensors"):
        want.update(load_file(f))
    for f in (res / "export").glob("*.safetensors"):
        got.update(load_file(f))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for r in (0, 1):  # each rank's load added at most one tensor (+ slack) to its peak host memory
        rep = json.loads((res / f"load_rank{r}.json").read_text())
        assert rep["rss_peak"] - rep["rss_before"] <= rep["largest_hf_bytes"] + (4 << 20), rep


def test_export_cli_writes_a_folder_transformers_loads(tiny_hf, tmp_path):
    """``r1mega-export OUT model.hf_path=...`` (here: the model as loaded, no megatron checkpoint)."""
    import subprocess
    import sys

    from tests.launch import REPO

    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "r1mega.model.hf_io", str(out), f"model.hf_path={tiny_hf['deepseek_v3']}",
           "train.device=cpu"]  # fmt: skip
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(toks).logits, hf_logits(tiny_hf["deepseek_v3"], toks), atol=0, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_te_spec_names_load_the_same(runtime, tiny_hf, name):
    """TE builds only on a GPU: its parameter names (fused norms, grouped experts), applied to the local model,
    load the same tensors."""
    from types import SimpleNamespace

    from r1mega.model.hf_load import load_hf_weights
    from tests.test_hf_export import te_spec_name

    gpt, m, _ = load(tiny_hf[name])
    want = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    with torch.no_grad():
        for p in gpt.parameters():
            p.zero_()
    dense = set(range(m.first_k_dense_layers))
    renamed = [(te_spec_name(n, dense, m.multi_latent_attention), p) for n, p in gpt.named_parameters()]
    assert sum(a != n for (a, _), n in zip(renamed, want)) > 5
    te_like = SimpleNamespace(named_parameters=lambda: iter(renamed), named_buffers=gpt.named_buffers,
                              decoder=gpt.decoder, modules=gpt.modules)  # fmt: skip
    load_hf_weights(te_like, m)
    for n, p in gpt.named_parameters():
        assert torch.equal(p, want[n]), n
