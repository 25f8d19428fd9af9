"""Config errors stop at start-up naming the field: each section's own checks (zero / negative values, choices),
keys that only a Hydra ``+`` could add, and data.template=chat through a HF tokenizer's chat template."""

from __future__ import annotations

import pytest

from r1mega.config import Config, ConfigError, config_from_hydra, register_configs, validate


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from r1mega.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize(
    "override,field",
    [
        ("rollout.prompts_per_step=0", "rollout.prompts_per_step"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("rollout.sampling.max_new_tokens=-1", "rollout.sampling.max_new_tokens"),
        ("optim.lr=0", "optim.lr"),
        ("sft.batch_size=0", "sft.batch_size"),
        ("reward.num_workers=0", "reward.num_workers"),
        ("model.hidden_size=-64", "model.hidden_size"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("algo.loss_agg=token-sum", "algo.loss_agg"),
        ("train.precision=fp16", "train.precision"),
        ("algo.loss=no_such_loss", "algo.loss"),
        ("rollout.backend=vllm", "rollout.backend"),
        ("+algo.betaa=0", "algo.betaa"),
        ("+rollout.sampling.temprature=1", "rollout.sampling.temprature"),
        ("+foo=1", "foo"),
    ],
)
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_hydra(_compose([override]))


def test_engine_groups_are_typed():
    from r1mega.config import MegatronRolloutConfig, SGLangRolloutConfig
    from r1mega.rollout import rollout_engine_class

    cfg = config_from_hydra(_compose(["rollout=sglang", "rollout.mem_fraction=0.3", "rollout.prompts_per_step=8"]))
    assert isinstance(cfg.rollout, SGLangRolloutConfig)
    assert (cfg.rollout.mem_fraction, cfg.rollout.backend) == (0.3, "sglang")
    assert cfg.rollout.prompts_per_step == 8 and cfg.rollout.sampling.max_new_tokens == 32  # conf/config.yaml's
    assert isinstance(config_from_hydra(_compose([])).rollout, MegatronRolloutConfig)
    with pytest.raises(ConfigError, match="mem_fraction"):
        config_from_hydra(_compose(["rollout=sglang", "rollout.mem_fraction=1.5"]))
    wrong = config_from_hydra(_compose(["rollout.backend=sglang"]))  # the engine's settings group not selected
    with pytest.raises(ConfigError, match="rollout=sglang"):
        rollout_engine_class(wrong)


def test_validate_rechecks_sections_changed_after_construction():
    cfg = Config()
    validate(cfg)
    cfg.train.micro_batch_size = 0
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=0"):
        validate(cfg)
    cfg = Config()
    cfg.data.template = "chat"  # cross-section: needs a HF tokenizer
    with pytest.raises(ConfigError, match="model.tokenizer"):
        validate(cfg)


def test_cli_config_error_exits_2(tmp_path):
    from tests.test_trainer import _cli

    proc = _cli(["+algo.betaa=0"], tmp_path)
    assert proc.returncode == 2 and "config error: unknown config key algo.betaa" in proc.stderr
    proc = _cli(["rollout.prompts_per_step=0"], tmp_path)
    assert proc.returncode == 2 and "config error: rollout.prompts_per_step=0 must be > 0" in proc.stderr


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A word-level HF tokenizer with a chat template, built offline from `tokenizers` objects."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>", "what", "is", "2+2", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("chat_tok")
    fast.save_pretrained(path)
    return path, {w: i for i, w in enumerate(words)}


def test_chat_template_is_applied(chat_tokenizer_dir):
    from r1mega.data.tasks import encode_prompt, render_prompt
    from r1mega.data.tokenizer import HFTokenizer

    path, ids = chat_tokenizer_dir
    tok = HFTokenizer(str(path))
    got = encode_prompt(tok, "what is 2+2 ?", "chat")
    # the template written out by hand: one user turn, then the assistant's generation prompt
    want = [ids[w] for w in ["<|user|>", "what", "is", "2+2", "?", "<|end|>", "<|assistant|>"]]
    assert got == want
    assert encode_prompt(tok, "what is 2+2 ?", "compact") == tok.encode(render_prompt("what is 2+2 ?", "compact"))


def test_chat_template_missing_is_named(chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from r1mega.data.tasks import encode_prompt
    from r1mega.data.tokenizer import HFTokenizer

    path, _ = chat_tokenizer_dir
    plain = AutoTokenizer.from_pretrained(path)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(HFTokenizer(str(tmp_path)), "what is 2+2 ?", "chat")
