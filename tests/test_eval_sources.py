"""eval.models (r1mega/eval/sources.py): what one r1mega-eval process evaluates, and the checks that refuse a mix of
architectures or tokenizers before any model is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from r1mega.config import ConfigError, ModelConfig
from r1mega.eval.sources import architecture_config, eval_models
from tests.chatml_tokenizer import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _copy(src: Path, dst: Path, edit=None, file: str = "config.json") -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        data = json.loads((dst / file).read_text())
        edit(data)
        (dst / file).write_text(json.dumps(data))
    return dst


def test_single_model_and_output_layout(tiny, tmp_path):
    m = ModelConfig(checkpoint="runs/x/step_000010", hf_path=str(tiny))
    (one,) = eval_models(m, {}, "runs/e/eval.json")
    assert (one.label, one.path, one.output, one.is_hf) == ("", "runs/x/step_000010", "runs/e/eval.json", False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    got = eval_models(ModelConfig(), [f"cold:{tiny}", str(ckpt)], "runs/e/eval.json")
    assert [(g.label, g.path, g.output, g.is_hf) for g in got] == [
        ("cold", str(tiny), "runs/e/cold/eval.json", True),
        ("ckpt", str(ckpt), "runs/e/ckpt/eval.json", False),
    ]
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        eval_models(ModelConfig(), [], "eval.json")
    with pytest.raises(ConfigError, match="label 'a' is empty or used twice"):
        eval_models(ModelConfig(), [f"a:{tiny}", f"a:{ckpt}"], "eval.json")
    with pytest.raises(ConfigError, match=r"eval.models.x=.*nope: no such folder"):
        eval_models(ModelConfig(), [f"x:{tmp_path / 'nope'}"], "eval.json")


def test_architecture_from_the_first_hf_entry_and_mismatches_refused(tiny, tmp_path):
    same = _copy(tiny, tmp_path / "same")
    models = eval_models(ModelConfig(), [f"a:{tiny}", f"b:{same}"], "eval.json")
    resolved = architecture_config(ModelConfig(), models)
    assert resolved.hf_path == str(tiny) and resolved.num_layers == 2 and resolved.tokenizer == str(tiny)
    deeper = _copy(tiny, tmp_path / "deeper", lambda c: c.update(num_hidden_layers=3))
    models = eval_models(ModelConfig(), [f"a:{tiny}", f"b:{deeper}"], "eval.json")
    with pytest.raises(ConfigError, match=r"eval.models.b=.*another architecture.*'num_layers': \(2, 3\)"):
        architecture_config(ModelConfig(), models)

    def swap_two_tokens(tok):
        vocab = tok["model"]["vocab"]
        a, b = list(vocab)[300:302]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    other_vocab = _copy(tiny, tmp_path / "vocab", swap_two_tokens, file="tokenizer.json")
    models = eval_models(ModelConfig(), [f"a:{tiny}", f"b:{other_vocab}"], "eval.json")
    with pytest.raises(ConfigError, match=r"eval.models.b=.*another vocabulary"):
        architecture_config(ModelConfig(), models)
