"""Tokenizers: a built-in character tokenizer (the embedded default: no downloads) and HF tokenizers.

Both expose the small surface the rollout engines and the trainer need: encode / decode, ``eos_id``,
``pad_id``, ``vocab_size``; plus ``tokenize`` / ``detokenize`` / ``eod`` / ``bos`` for megatron's
inference controller.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Protocol

R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _MegatronTokenizerSurface:
    """The names megatron's inference controller calls (``eod`` doubles as its pad and stop token)."""

    eos_id: int
    bos = None

    @property
    def eod(self) -> int:
        return self.eos_id

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int], **_) -> str:
        return self.decode(ids)


class CharTokenizer(_MegatronTokenizerSurface):
    """Printable ASCII characters, one id each, plus the four R1 tags as single tokens.

    One token per tag keeps the tiny default's responses short (and the format easy to learn);
    rewards work on the decoded text, so they are the same code as for real tokenizers.
    """

    SPECIALS = ("<pad>", "<eos>", *R1_TAGS)

    def __init__(self) -> None:
        chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
        self.itos: list[str] = list(self.SPECIALS) + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.pad_id = self.stoi["<pad>"]
        self.eos_id = self.stoi["<eos>"]

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for tag in R1_TAGS:
                if text.startswith(tag, i):
                    ids.append(self.stoi[tag])
                    i += len(tag)
                    break
            else:
                ch = text[i]
                if ch not in self.stoi:
                    raise ValueError(f"character {ch!r} is not in the char tokenizer's vocabulary (printable ASCII)")
                ids.append(self.stoi[ch])
                i += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id and 0 <= i < self.vocab_size:
                out.append(self.itos[i])
        return "".join(out)


_PROBE = "r1megaEndOfTurnProbe"


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn: the first special token the chat template writes after the
    assistant's content; the tokenizer's ``eos_token`` when there is no chat template (or it writes none).

    ``eos_token`` alone is not trustworthy: SmolLM2's GGUF tokenizer says ``<|im_start|>`` (id 1) while its
    ChatML turns end with ``<|im_end|>`` (id 2, what its config.json says); SFT targets ending in id 1 teach the
    model to go on with ``assistant\n<think>...`` and engines waiting for id 1 never stop after ``</answer>``.
    """
    if getattr(tok, "chat_template", None):
        turn = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": _PROBE}]
        text = tok.apply_chat_template(turn, tokenize=False)
        if _PROBE in text:
            special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
            after = tok.encode(text.split(_PROBE, 1)[1], add_special_tokens=False)
            for i in after:
                if i in special:
                    return int(i)
    if tok.eos_token_id is None:
        raise ValueError(
            f"the tokenizer at {tok.name_or_path!r} has neither an eos_token nor a chat template that ends a turn "
            "with a special token; set eos_token in its tokenizer_config.json"
        )
    return int(tok.eos_token_id)


class HFTokenizer(_MegatronTokenizerSurface):
    """A Hugging Face tokenizer from a local path (nothing is downloaded at run time)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = end_of_turn_id(self.tok)  # what SFT targets end with, engines stop on and decode cuts at
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_chat(self, user: str) -> list[int]:
        """One user turn in the tokenizer's chat template, plus the assistant's generation prompt."""
        if not self.tok.chat_template:
            raise ValueError(
                f"data.template=chat: the tokenizer at {self.tok.name_or_path!r} has no chat template; "
                "use data.template=r1_zero (or a chat model's tokenizer)"
            )
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return self.tok.encode(text, add_special_tokens=False)  # the template carries its own special tokens

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


def build_tokenizer(spec: str) -> CharTokenizer | HFTokenizer:
    return CharTokenizer() if spec == "char" else HFTokenizer(spec)
