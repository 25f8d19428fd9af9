"""The shipped eval sets load completely (row counts against the files themselves, gold answers that the reward
code accepts), a user's JSONL loads with its own keys, and a malformed row stops with file:line."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from r1mega.config import ConfigError, DataConfig, EvalConfig
from r1mega.eval.datasets import DATA_DIR, SHIPPED, DatasetError, load_eval_sets, load_set, read_jsonl
from r1mega.eval.templates import encode_prompts, prompt_text
from r1mega.rewards.math import is_equivalent

# sha256 of the files as published (each <set>.SOURCE.md): the package ships them unmodified
SHA256 = {
    "gsm8k": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "aime24": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "aime25": "3cc4fb3b9735e74c6da28f8da5fa7b2db23ff84e09b2b81ca8cfdef96d7cf639",
    "amc23": "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
}
EXPECTED_ROWS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_set_loads_every_row(name):
    path = DATA_DIR / SHIPPED[name].file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name]
    assert (DATA_DIR / f"{name}.SOURCE.md").is_file()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    problems = load_set(name)
    assert len(problems) == len(rows) == EXPECTED_ROWS[name]
    spec = SHIPPED[name]
    for p, row in zip(problems, rows):
        assert p.question == row[spec.question_key] and p.answer
        raw = str(row[spec.answer_key])
        if name == "gsm8k":
            assert p.answer == raw.split("#### ")[-1].strip() and "####" not in p.answer
    # the reward code reads each set's gold answers as intended
    if name in ("aime24", "aime25", "amc23", "gsm8k"):  # integer answers, however stored
        for p, row in zip(problems, rows):
            gold = str(row[spec.answer_key]).split("#### ")[-1]
            number = re.sub(r"\^\\circ$", "", gold.strip()).replace(",", "")
            assert is_equivalent(str(int(float(number))), p.answer), (name, p.answer)


def test_shipped_answer_forms():
    assert load_set("amc23")[0].answer == "27"  # JSON 27.0
    assert load_set("aime24")[0].answer == "204"
    assert any(p.answer == "336^\\circ" for p in load_set("aime25"))
    assert load_set("gsm8k")[0].answer == "18"
    assert load_set("math500")[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert sum(f.stat().st_size for f in DATA_DIR.iterdir()) < 3_000_000  # a few MB at most


def test_user_jsonl_with_own_keys_and_malformed_rows(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text('{"q": "1+2", "a": 3}\n\n{"q": "2+2", "a": "4"}\n')
    ps = read_jsonl(good, "q", "a")
    assert [(p.question, p.answer) for p in ps] == [("1+2", "3"), ("2+2", "4")]
    cfg = EvalConfig(sets=[str(good), "aime24"], question_key="q", answer_key="a", limit=5)
    sets = load_eval_sets(cfg)
    assert list(sets) == ["mine", "aime24"] and len(sets["mine"]) == 2 and len(sets["aime24"]) == 5
    cases = {
        '{"q": "1+2", "a": 3}\n{"q": "2+2", "a": 4\n': ":2: not valid JSON",
        '{"q": "1", "a": 1}\n\n["q", "a"]\n': ":3: a row must be a JSON object",
        '{"q": "1", "a": 1}\n{"question": "x", "a": 1}\n': ":2: no field 'q'",
        '{"q": "1", "a": null}\n': ":1: field 'a' must be",
        '{"q": "", "a": 1}\n': ":1: field 'q' must be a non-empty string",
    }
    for i, (text, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(text)
        with pytest.raises(DatasetError) as e:
            read_jsonl(bad, "q", "a")
        assert f"{bad}{msg}" in str(e.value)
    with pytest.raises(DatasetError, match="no such file"):
        load_set(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="unknown set 'gsm9k'"):
        load_eval_sets(EvalConfig(sets=["gsm9k"]))
    with pytest.raises(ConfigError, match="twice"):
        load_eval_sets(EvalConfig(sets=["aime24", "aime24"]))


def test_heldout_set_is_the_training_configs_and_config_checks():
    data = DataConfig(task="arithmetic", num_eval=7, arith_ops="+")
    sets = load_eval_sets(EvalConfig(sets=["heldout"]), data)
    from r1mega.data.tasks import load_problems

    assert sets["heldout"] == load_problems(data)[1]
    for bad, field in [({"k": 0}, "eval.k"), ({"top_p": 1.5}, "eval.top_p"), ({"template": "x"}, "eval.template")]:
        with pytest.raises(ConfigError, match=field):
            EvalConfig(**bad)
    with pytest.raises(ConfigError, match="eval.pass_at"):
        EvalConfig(k=4, pass_at=[8])


def test_templates():
    from r1mega.data.tasks import render_prompt
    from r1mega.data.tokenizer import CharTokenizer

    tok = CharTokenizer()
    assert prompt_text("1+2", "compact", tok) == render_prompt("1+2", "compact") == "1+2=?"
    assert prompt_text("x", "r1_zero", tok) == render_prompt("x", "r1_zero")
    assert encode_prompts(["1+2"], "compact", tok) == [tok.encode("1+2=?")]
    with pytest.raises(ConfigError, match="chat template"):
        prompt_text("1+2", "chat", tok)


def test_chat_template_with_boxed_instruction(tmp_path):
    """A real transformers tokenizer (built offline) with a ChatML chat template, through HFTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.eval.templates import BOXED_INSTRUCTION

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "What", "is", "1+2?"]
    words += BOXED_INSTRUCTION.split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    hf.chat_template = chatml
    hf.save_pretrained(tmp_path / "tok")
    tok = HFTokenizer(str(tmp_path / "tok"))
    text = prompt_text("What is 1+2?", "chat", tok)
    assert text == f"<|im_start|>user\nWhat is 1+2?\n{BOXED_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompts(["What is 1+2?"], "chat", tok)[0]
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>") and hf.unk_token_id not in ids
