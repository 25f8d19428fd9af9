"""Evaluation prompts: the training templates (``r1mega.data.tasks.render_prompt``: R1-Zero's, or the compact
one of the tiny default) or the tokenizer's own chat template with the usual instruction to box the answer.

``chat`` is the common protocol for instruct models (Qwen2.5-Math's evaluation, "Please reason step by step, and
put your final answer within \\boxed{}."); :func:`r1mega.rewards.math.extract_answer` reads the last ``\\boxed{}``
when there is no ``<answer>`` tag, so both protocols are scored by the same reward code.
"""

from __future__ import annotations

from r1mega.config import ConfigError
from r1mega.data.tasks import render_prompt

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("r1_zero", "compact", "chat")


def prompt_text(question: str, template: str, tokenizer) -> str:
    """The prompt string for ``question`` (before tokenization)."""
    if template != "chat":
        if template not in TEMPLATES:
            raise ConfigError(f"eval.template={template!r} is not one of {list(TEMPLATES)}")
        return render_prompt(question, template)
    hf = getattr(tokenizer, "tok", None)  # r1mega.data.tokenizer.HFTokenizer wraps the transformers tokenizer
    if hf is None or not getattr(hf, "chat_template", None):
        raise ConfigError(
            "eval.template=chat needs a Hugging Face tokenizer with a chat template (model.tokenizer=<path>); "
            "use eval.template=r1_zero or compact with this tokenizer"
        )
    messages = [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}]
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(questions: list[str], template: str, tokenizer) -> list[list[int]]:
    """Token ids of every prompt (the chat template's special tokens are in its text, encoded as such)."""
    return [tokenizer.encode(prompt_text(q, template, tokenizer)) for q in questions]
