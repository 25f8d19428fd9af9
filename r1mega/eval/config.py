"""``EvalConfig``: the ``eval`` section of the typed config (r1mega-eval, and evaluation during training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from r1mega.config_checks import ConfigError, _check, _in_range

EvalTemplate = Literal[None, "r1_zero", "compact", "chat"]
Extract = Literal["strict", "last_number"]


@dataclass
class EvalConfig:
    """R1's protocol by default (arXiv 2501.12948, sec. 3.1): k answers per problem at temperature 0.6, top-p
    0.95; pass@1 = mean correctness over the k answers, cons@k = majority vote, pass@k' by the unbiased (Codex)
    estimator. See r1mega/eval/."""

    # shipped sets (gsm8k math500 aime24 aime25 amc23), "heldout" (data.*'s held-out problems), or .jsonl paths.
    # Training evaluates these (heldout always); r1mega-eval's conf/eval.yaml names the five shipped sets
    sets: list[str] = field(default_factory=lambda: ["heldout"])
    question_key: str = "question"  # fields of a user's .jsonl set (shipped sets know their own)
    answer_key: str = "answer"
    limit: int = 0  # evaluate the first N problems of each set; 0 = all
    k: int = 16  # sampled answers per problem (R1: 64 for AIME; 16 here)
    pass_at: list[int] = field(default_factory=list)  # k' of the pass@k' columns; empty = 1, 2, 4, ... and k
    greedy: bool = False  # one greedy answer per problem instead (k and the sampling fields are ignored)
    # also one greedy answer per problem, in the same run, before the k sampled ones (R1 reports sampled pass@1; the
    # greedy score beside it costs no second model load): <output stem>_greedy.json, metrics eval_greedy/*
    also_greedy: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    max_new_tokens: Optional[int] = None  # None = rollout.sampling.max_new_tokens (R1: 32768)
    template: Optional[str] = None  # r1_zero | compact | chat (+ a \boxed{} instruction); None = data.template
    seed: int = 0
    chunk_problems: int = 256  # problems per engine call (each with its k samples); the progress bar steps per call
    output: Optional[str] = None  # the per-problem results JSON; None = <logging.out_dir>/eval.json
    # several models of one architecture and tokenizer, in turn, by one process on one engine (one start-up; each
    # one's weights pushed as after a training step): [LABEL:]PATH of an HF folder or a megatron checkpoint, e.g.
    # eval.models=[cold:runs/cold_hf,rl:runs/x/ckpt/step_000099] (no label: the folder's name); label L's results go
    # to <output's folder>/L/<output's name>. model.checkpoint / model.hf_path then give only the architecture
    # (unset: the first HF entry's)
    models: list[str] = field(default_factory=list)
    save_responses: bool = True  # keep every response text in the JSON (large for long answers)
    # a stopped run of the same evaluation (model, settings, problems) goes on after its last finished chunk,
    # kept beside the results JSON (r1mega/eval/chunks.py); false = start over
    resume: bool = True
    # strict: the answer is the last <answer>...</answer> or \boxed{} (R1's rule, as the reward); last_number: else the
    # last number of the response (lm-eval's GSM8K "flexible-extract"), to set a score beside published few-shot ones
    extract: str = "strict"

    def __post_init__(self) -> None:
        _check(self, "eval", positive="k temperature chunk_problems max_new_tokens", nonneg="limit top_k",
               choices={"template": EvalTemplate, "extract": Extract})  # fmt: skip
        _in_range(self, "eval", "top_p", "(0, 1]")
        if not self.sets:
            raise ConfigError("eval.sets is empty; name at least one set, e.g. eval.sets=[gsm8k]")
        bad = [p for p in self.pass_at if not 1 <= p <= self.k]
        if bad and not self.greedy:
            raise ConfigError(f"eval.pass_at={list(self.pass_at)}: {bad} not in [1, eval.k={self.k}]")
