"""The evaluation loop: every problem's k samples through the rollout engine, scored by the reward workers.

``evaluate(engine, tokenizer, scorer, problems_by_set, settings)`` is the one entry point, for ``r1mega-eval``
and for evaluation during training (the trainer passes its own engine, tokenizer and scorer). It

1. puts the problems of all sets in one list (each data-parallel rank takes every dp_size-th one) and sends them
   to the engine in chunks of ``chunk_problems`` problems x k samples: one ``generate`` call per chunk, so SGLang
   batches thousands of sequences at once; the progress bar steps per chunk (problems/s);
2. scores every sample with :class:`r1mega.rewards.RewardScorer` (numbers in-process, the rest in its killable
   math-verify workers);
3. votes (cons@k): the answer-equivalence checks between distinct answers of a problem also go through the
   scorer's workers, batched for all problems at once (sympy on model output can hang; the workers time out);
4. gathers the per-problem results from all data-parallel ranks (every rank returns the full results).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.data.tasks import Problem
from r1mega.eval.chunks import ChunkStore, Sample, chunk_path, fingerprint
from r1mega.eval.metrics import cons_at_k, standard_error
from r1mega.eval.results import EvalResults, ProblemResult, SampleResult, SetResult, summarize, write_json
from r1mega.eval.templates import encode_prompts
from r1mega.rewards import extract_answer
from r1mega.rollout.base import SamplingParams


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate (the resolved ``eval.*`` config; see :class:`r1mega.config.EvalConfig`)."""

    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 1024
    greedy: bool = False  # one greedy answer per problem; k / temperature / top_p / top_k are then unused
    template: str = "r1_zero"
    pass_at: tuple[int, ...] = ()  # empty = 1, 2, 4, ... and k
    seed: int = 0
    chunk_problems: int = 256
    save_responses: bool = True
    progress: bool = True
    extract: str = "strict"  # eval.extract: strict | last_number

    @property
    def samples(self) -> int:
        return 1 if self.greedy else self.k

    def sampling(self, chunk: int) -> SamplingParams:
        if self.greedy:
            return SamplingParams(1.0, 1.0, 1, self.max_new_tokens, logprobs=False)
        return SamplingParams(
            self.temperature, self.top_p, self.top_k, self.max_new_tokens, seed=self.seed + chunk, logprobs=False
        )

    @classmethod
    def from_config(cls, cfg) -> EvalSettings:
        """From the typed ``Config``: ``eval.*``, with ``data.template`` / ``rollout.sampling.max_new_tokens``
        where ``eval.template`` / ``eval.max_new_tokens`` are unset, and ``logging.progress``."""
        e = cfg.eval
        return cls(
            k=e.k,
            temperature=e.temperature,
            top_p=e.top_p,
            top_k=e.top_k,
            max_new_tokens=e.max_new_tokens or cfg.rollout.sampling.max_new_tokens,
            greedy=e.greedy,
            template=e.template or cfg.data.template,
            pass_at=tuple(e.pass_at),
            seed=e.seed,
            chunk_problems=e.chunk_problems,
            save_responses=e.save_responses,
            progress=cfg.logging.progress,
            extract=e.extract,
        )


def _data_parallel() -> tuple[int, int, object]:
    """(rank, size, group) of data parallelism; (0, 1, None) outside a megatron runtime."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return (
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_group(),
            )
    except ImportError:
        pass
    return 0, 1, None


def _as_answer(answer: str) -> str:
    """A bare answer as a response the scorer extracts it from unchanged (extract_answer strips the tags)."""
    return f"<answer>{answer}</answer>"


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_of(text: str, rule: str = "strict") -> str | None:
    """The final answer of a response under ``eval.extract``: R1's tags / ``\\boxed{}`` (``strict``), falling back
    to the last number in the text (``last_number``, as lm-eval's GSM8K flexible extract; thousands commas dropped)."""
    answer = extract_answer(text)
    if answer is not None or rule == "strict":
        return answer
    numbers = _LAST_NUMBER.findall(text or "")
    return numbers[-1].replace(",", "") if numbers else None


def equivalence_table(scorer, answer_lists: list[list[str | None]]) -> dict[tuple[str, str], bool]:
    """``is_equivalent(a, b)`` for every ordered pair of distinct answers within each problem, via the scorer
    (the fast numeric path in-process, math-verify in its workers; a timed-out pair counts as not equal)."""
    pairs: dict[tuple[str, str], None] = {}
    for answers in answer_lists:
        distinct = list(dict.fromkeys(a for a in answers if a is not None))
        for a in distinct:
            for b in distinct:
                if a != b:
                    pairs[(a, b)] = None
    if not pairs:
        return {}
    keys = list(pairs)
    batch = scorer.score([_as_answer(a) for a, _ in keys], [b for _, b in keys])
    return {key: acc > 0 for key, acc in zip(keys, batch.accuracy)}


_PROGRESS_STATS = ("pass@1", "format_rate", "answer_rate", "length_mean", "truncated_frac")


def write_progress(
    path: str | Path,
    names: list[str],
    samples: list[Sample],
    *,
    chunks: int,
    of: int,
    wall_s: float,
    gen_s: float,
    per_problem: int = 1,
) -> None:
    """The running per-set means of the samples scored so far (one name per sample, ``per_problem`` consecutive
    samples per problem), written atomically, with the generation throughput and pass@1's standard error over the
    problems done (as results.summarize computes it): what a run stopped by a time limit, or a machine lost mid-way,
    leaves behind is enough for the report's row."""
    sets: dict[str, dict[str, float]] = {}
    solved: dict[str, list[float]] = {}  # per set: each finished problem's fraction of correct samples
    for j in range(0, len(samples) - per_problem + 1, per_problem):
        group = samples[j : j + per_problem]
        solved.setdefault(names[j], []).append(sum(float(x.accuracy > 0) for x in group) / per_problem)
    for name, x in zip(names, samples):
        d = sets.setdefault(name, dict.fromkeys(("samples", *_PROGRESS_STATS), 0.0))
        d["samples"] += 1
        d["pass@1"] += float(x.accuracy > 0)
        d["format_rate"] += float(x.format > 0)
        d["answer_rate"] += float(x.answer is not None)  # as results.summarize counts it
        d["length_mean"] += x.length
        d["truncated_frac"] += float(not x.finished)
    for name, d in sets.items():
        d["samples"] = int(d["samples"])
        for k in _PROGRESS_STATS:
            d[k] /= d["samples"]
        d["problems"] = len(solved.get(name, []))
        d["pass@1_se"] = standard_error(solved.get(name, []))
    tokens = sum(x.length for x in samples)
    write_json(
        {
            "chunks_done": chunks,
            "chunks": of,
            "wall_s": wall_s,
            "generation_s": gen_s,
            "generated_tokens": tokens,
            "gen_tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
            "sets": sets,
        },
        path,
    )


def _resumable(chunks_path: str | Path | None, key: str, num_chunks: int, resume: bool):
    """(store, finished chunks) of this rank; every rank keeps the same number (the engine calls are collective)."""
    if chunks_path is None:
        return None, []
    store = ChunkStore(chunk_path(chunks_path, _global_rank()), key)
    done = store.load()[:num_chunks] if resume else []
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        n = torch.tensor([len(done)], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        done = done[: int(n.item())]
    store.reset(done)
    return store, done


def _run_chunk(engine, tokenizer, scorer, settings: EvalSettings, c: int, prompts, filler, golds):
    """One engine call (chunk ``c``: each prompt ``settings.samples`` times), scored: (samples, generation s)."""
    n = settings.samples
    chunk = [p for p in prompts for _ in range(n)]
    t = time.perf_counter()
    out = engine.generate(chunk or [filler], settings.sampling(c))[: len(chunk)]
    gen_s = time.perf_counter() - t
    texts = [tokenizer.decode(r.response_ids) for r in out]
    golds = [g for g in golds for _ in range(n)]
    rewards = scorer.score(texts, golds)
    answers = [answer_of(t, settings.extract) for t in texts]
    accuracy = rewards.accuracy
    if settings.extract != "strict":  # the correctness of the answer this rule extracts (the format stays R1's)
        accuracy = scorer.score([_as_answer(a) if a else "" for a in answers], golds).accuracy
    keep = settings.save_responses
    return [
        Sample(a, float(acc), float(f), len(r.response_ids), bool(r.finished), text if keep else None)
        for a, acc, f, r, text in zip(answers, accuracy, rewards.format, out, texts)
    ], gen_s


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def remove_chunks(results_path: str | Path) -> None:
    """This rank's chunk file of a finished evaluation (call after the results JSON is written)."""
    chunk_path(results_path, _global_rank()).unlink(missing_ok=True)


def evaluate(
    engine,
    tokenizer,
    scorer,
    problems_by_set: dict[str, list[Problem]],
    settings: EvalSettings,
    meta: dict | None = None,
    progress_path: str | Path | None = None,
    chunks_path: str | Path | None = None,
    resume: bool = True,
) -> EvalResults:
    """Evaluate every set; returns the full per-problem results with each set's summary (on every rank).

    ``engine`` is a :class:`r1mega.rollout.base.RolloutEngine` holding the weights to evaluate; its memory is
    resumed for the evaluation and released afterwards (as the trainer does around generation).
    ``progress_path``: after every chunk, data-parallel rank 0 rewrites this JSON with the running per-set
    pass@1 / format rate of its problems so far, so a run stopped by a time limit still leaves its numbers.
    ``chunks_path`` (the results JSON's path): every finished chunk is kept beside it and, with ``resume``, a rerun
    of the same evaluation starts after the last one (r1mega/eval/chunks.py); the caller removes them once the
    results are written (``remove_chunks``).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    dp_rank, dp_size, dp_group = _data_parallel()
    items = [(name, i, p) for name, probs in problems_by_set.items() for i, p in enumerate(probs)]
    if not items:
        raise ValueError("nothing to evaluate: every set is empty")
    mine = items[dp_rank::dp_size]
    n = settings.samples
    # every rank makes the same number of engine calls (EP engines generate collectively across DP ranks)
    per_rank = math.ceil(len(items) / dp_size)
    num_chunks = math.ceil(per_rank / settings.chunk_problems)
    key = fingerprint(
        {k: v for k, v in asdict(settings).items() if k != "progress"},
        {k: (meta or {}).get(k) for k in ("model", "checkpoint", "hf_path", "engine")},
        [(name, p.question, p.answer) for name, _, p in mine],
    )
    store, done = _resumable(chunks_path, key, num_chunks, resume)
    prompts = encode_prompts([p.question for _, _, p in mine], settings.template, tokenizer)
    filler = encode_prompts([items[0][2].question], settings.template, tokenizer)[0]
    bar = tqdm(total=len(items), unit="problem", desc="eval", disable=not (settings.progress and dp_rank == 0))
    samples: list[Sample] = []
    gen_s = 0.0
    engine.resume_memory()
    try:
        for c in range(num_chunks):
            lo, hi = c * settings.chunk_problems, min((c + 1) * settings.chunk_problems, len(mine))
            if c < len(done):  # finished by an earlier run of this evaluation
                samples += done[c][0]
                gen_s += done[c][1]
            else:
                chunk_samples, chunk_s = _run_chunk(engine, tokenizer, scorer, settings, c, prompts[lo:hi], filler,
                                                    [p.answer for _, _, p in mine[lo:hi]])  # fmt: skip
                samples += chunk_samples
                gen_s += chunk_s
                if store is not None:
                    store.append(c, chunk_samples, chunk_s)
            if progress_path is not None and dp_rank == 0:
                names = [name for name, _, _ in mine[:hi] for _ in range(n)]
                write_progress(progress_path, names, samples, chunks=c + 1, of=num_chunks,
                               wall_s=time.perf_counter() - t0, gen_s=gen_s, per_problem=n)  # fmt: skip
            bar.update(min(max(hi - lo, 0) * dp_size, len(items) - bar.n))  # rank 0's pace stands for all
            bar.set_postfix(pass1=f"{sum(x.accuracy for x in samples) / max(len(samples), 1):.3f}")
    finally:
        engine.release_memory()
        bar.close()

    by_problem = [[x.answer for x in samples[j * n : (j + 1) * n]] for j in range(len(mine))]
    table = equivalence_table(scorer, by_problem)
    same = lambda a, b: table.get((a, b), False)  # noqa: E731
    results: list[tuple[str, ProblemResult]] = []
    for j, (name, idx, problem) in enumerate(mine):
        mine_samples = [
            SampleResult(
                answer=x.answer,
                correct=x.accuracy > 0,
                format=x.format > 0,
                length=x.length,
                finished=x.finished,
                response=x.text,
            )
            for x in samples[j * n : (j + 1) * n]
        ]
        ok, win, votes = cons_at_k([s.answer for s in mine_samples], [s.correct for s in mine_samples], same)
        results.append(
            (name, ProblemResult(idx, problem.question, problem.answer, mine_samples, votes, win and win.answer, ok))
        )
    generated = sum(x.length for x in samples)
    if dp_size > 1:
        shards: list = [None] * dp_size
        dist.all_gather_object(shards, (results, generated, gen_s), group=dp_group)
        results = [r for shard in shards for r in shard[0]]
        generated = sum(shard[1] for shard in shards)
        gen_s = max(shard[2] for shard in shards)
    order = {name: i for i, name in enumerate(problems_by_set)}
    sets = {name: SetResult(name, []) for name in problems_by_set}
    for name, pr in sorted(results, key=lambda x: (order[x[0]], x[1].index)):
        sets[name].problems.append(pr)
    for s in sets.values():
        s.metrics = summarize(s.problems, settings.pass_at)
    return EvalResults(asdict(settings), sets, time.perf_counter() - t0, gen_s, generated, dict(meta or {}))
