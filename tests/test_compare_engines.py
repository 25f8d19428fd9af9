"""tools/compare_engines.py finds the first layer where two forwards part (the SGLang side runs on the GPU).

The captures are checked against transformers' own ``output_hidden_states``; the parting detector against a
model with one layer's weights changed; the SGLang dump reader against the layout SGLang's tensor dumper
writes (fused add-RMSNorm outputs ``[normed, residual]``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
transformers = pytest.importorskip("transformers")
import compare_engines as ce  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ce.tiny_hf_config("llama", vocab=128)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_hidden_layers = 64, 96, 16, 3
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


IDS = [5, 17, 3, 99, 42, 7, 64, 12]


def test_streams_equal_transformers_hidden_states(model):
    acts, logp = ce.capture_hf(model, IDS)
    with torch.no_grad():
        out = model(torch.tensor([IDS]), output_hidden_states=True)
    hs = out.hidden_states  # embeddings, after layer 0, ..., after the final norm
    for i in range(model.config.num_hidden_layers - 1):
        torch.testing.assert_close(acts[f"stream.{i}.mlp"], hs[i + 1][0], rtol=0, atol=0)
    torch.testing.assert_close(logp, torch.log_softmax(out.logits[0], -1), rtol=0, atol=1e-6)
    assert acts["layers.0.self_attn.o_proj"].shape == (len(IDS), model.config.hidden_size)


def test_first_parting_names_the_changed_layer(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
    a, _ = ce.capture_hf(model, IDS)
    b, _ = ce.capture_hf(other, IDS)
    n = model.config.num_hidden_layers
    rows = ce.stream_rows(a, b, n)
    assert [r.name for r in rows[:3]] == ["stream.0.attn", "stream.0.mlp", "stream.1.attn"]
    assert not any(r.parts for r in rows[:3])
    assert ce.first_parting(rows).name == "stream.1.mlp"
    parted = [r.name for r in ce.module_rows(a, b, "layers.1.") if r.parts]
    assert parted[0] == "layers.1.mlp.down_proj"
    assert ce.first_parting(ce.stream_rows(a, a, n)) is None


def test_sglang_dump_layout_maps_to_the_same_points(model):
    """A dump in SGLang's layout built from the HF forward: leaves as tensors, fused norms as [normed, residual]."""
    acts, _ = ce.capture_hf(model, IDS)
    n = model.config.num_hidden_layers
    dump = {"model.forward_batch_info.input_ids": torch.tensor(IDS)}
    for i in range(n):
        dump[f"model.layers.{i}.self_attn.o_proj"] = acts[f"layers.{i}.self_attn.o_proj"]
        dump[f"model.layers.{i}.post_attention_layernorm"] = [
            acts[f"layers.{i}.post_attention_layernorm"], acts[f"stream.{i}.attn"]
        ]  # fmt: skip
        nxt = f"model.layers.{i + 1}.input_layernorm" if i + 1 < n else "model.norm"
        normed = acts[f"layers.{i + 1}.input_layernorm"] if i + 1 < n else acts["norm"]
        dump[nxt] = [normed, acts[f"stream.{i}.mlp"]]
    got = ce.sglang_acts(dump, n)
    rows = ce.stream_rows(acts, got, n)
    assert len(rows) == 2 * n and all(r.rel_rmse == 0 for r in rows)
    assert ce.module_rows(acts, got, "layers.0.")[0].name == "layers.0.self_attn.o_proj"


def test_logprob_gap_and_greedy_agreement():
    ref = torch.log_softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    ids = [1, 2, 3, 4]
    engine = [float(ref[0, 2]) + 0.01, float(ref[1, 3]), None]
    assert ce.logprob_gap(ref, ids, engine) == pytest.approx([0.01, 0.0])
    assert ce.greedy_equal([[1, 2, 9, 5], [3, 4]], [[1, 2, 9, 7], [3, 5]], eos=9) == 1


@pytest.mark.parametrize("family", ce.FAMILIES)
def test_tiny_family_models_save_reload_and_capture(tmp_path, family):
    """The GPU run's tiny models: each family saves, reloads with every tensor, and gives every stream point."""
    d = ce.make_tiny_hf(family, tmp_path / family, dtype=torch.float32)
    m, info = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    acts, logp = ce.capture_hf(m.eval(), IDS)
    n = m.config.num_hidden_layers
    assert all(f"stream.{i}.{p}" in acts for i in range(n) for p in ("attn", "mlp"))
    assert torch.isfinite(logp).all() and logp.shape == (len(IDS), m.config.vocab_size)
    names = {n for n, _ in ce.hf_tensors(m)}
    if family == "deepseek_v3":
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
