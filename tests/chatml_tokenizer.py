"""A small byte-level BPE tokenizer with SmolLM2's special-token layout, built offline in the test.

ids 0 / 1 / 2 = ``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>`` and a ChatML chat template, with
``eos_token = <|im_start|>``: the disagreement of SmolLM2's GGUF tokenizer (its turns end with ``<|im_end|>``),
so a test sees whether code picks ``tokenizer.eos_token`` or the chat template's real end of turn.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int = 400) -> list[str]:
    """GSM8K train questions and solutions (real text: the merges cover the digits, words and tags it needs)."""
    lines = Path("/work/shared/data/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    rows = [json.loads(x) for x in lines]
    return [r["question"] + "\n" + r["answer"] for r in rows] + ["<think> </think> <answer> </answer> user assistant"]


def build_chatml_tokenizer(out: Path, vocab_size: int = 800, chat_template: str | None = CHATML) -> Path:
    """Save the tokenizer to ``out`` (a folder AutoTokenizer.from_pretrained reads) and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_start|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


def build_tiny_llama(out: Path) -> Path:
    """A 2-layer random LlamaForCausalLM (GQA 4/2, tied embeddings, as SmolLM2) with this tokenizer, in ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_chatml_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
