"""One GRPO step, stage by stage: prompts -> rollout -> rewards -> advantages -> log-probs -> loss ->
optimizer -> weight sync. Everything here is orchestration; each stage's logic lives in its module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from r1mega.batch import TokenBatch, pad_rows
from r1mega.config import Config
from r1mega.data.sampler import PromptSampler
from r1mega.data.tasks import Problem, encode_prompt
from r1mega.engine import MegatronEngine
from r1mega.grpo.advantages import informative_groups
from r1mega.memory import memory_metrics
from r1mega.objectives import build_objective
from r1mega.registry import ADVANTAGES
from r1mega.rewards import RewardBatch, RewardScorer
from r1mega.rollout.base import Rollout, RolloutEngine, SamplingParams


@dataclass
class StepTimer:
    """Wall time per stage (generation / logprobs / training / weight_update), for the step log."""

    times: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def build_token_batch(rollouts: list[Rollout], pad_id: int, multiple: int) -> TokenBatch:
    """Rows = prompt + response; the mask marks response tokens in target space (position - 1).

    Also carries what the rollout engine measured: its log-probs (``rollout_logp``, NaN where unknown) and,
    when every rollout has them, the experts it routed each token to (``routed_experts``, for routing replay).
    """
    tokens = pad_rows([r.prompt_ids + r.response_ids for r in rollouts], pad_id, multiple)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for i, r in enumerate(rollouts):
        p = len(r.prompt_ids)
        mask[i, p - 1 : p - 1 + len(r.response_ids)] = 1.0
    batch = TokenBatch(tokens=tokens, mask=mask)
    batch.rollout_logp = scatter_response([r.logprobs for r in rollouts], rollouts, mask)
    if rollouts and all(r.routed_experts is not None for r in rollouts):
        batch.routed_experts = pad_routing([r.routed_experts for r in rollouts], tokens.shape[1])
    return batch


def pad_routing(routes: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """[tokens_i, layers, topk] per row -> [B, S, layers, topk]; positions no engine routed (the last token,
    padding) get experts 0..topk-1: distinct, as a top-k is, and never seen by the loss."""
    _, layers, topk = routes[0].shape
    out = torch.arange(topk).expand(len(routes), seq_len, layers, topk).clone()
    for i, r in enumerate(routes):
        out[i, : r.shape[0]] = r[:seq_len].long()
    return out


def scatter_response(values: list[list[float]], rollouts: list[Rollout], like: torch.Tensor) -> torch.Tensor:
    """Per-response-token lists -> a [B, S-1] tensor aligned with the batch's mask."""
    out = torch.zeros_like(like)
    for i, (v, r) in enumerate(zip(values, rollouts)):
        p = len(r.prompt_ids)
        out[i, p - 1 : p - 1 + len(v)] = torch.tensor(v, dtype=out.dtype)
    return out


def rollout_logprob_gap(rollouts: list[Rollout], batch: TokenBatch, is_last_stage: bool):
    """|log pi_rollout - log pi_trainer| per response token, and where it is known.

    Engines may not report the EOS log-prob (NaN), and trainer log-probs exist on the last pipeline
    stage only. The gap is the engine/trainer numerics mismatch that off-policy corrections watch.
    """
    rollout_logp = batch.rollout_logp
    if rollout_logp is None:
        rollout_logp = scatter_response([r.logprobs for r in rollouts], rollouts, batch.mask)
    known = batch.mask * torch.isfinite(rollout_logp)
    if not is_last_stage:
        known = torch.zeros_like(known)
    return (rollout_logp - batch.old_logp.cpu()).abs().nan_to_num(0.0) * known, known


def alignment_sums(diff: torch.Tensor, known: torch.Tensor) -> dict[str, float]:
    """The additive parts of the step's alignment metrics (summed over ranks before :func:`alignment_metrics`)."""
    return {
        "logp_diff_sum": float(diff.sum()),
        "logp_diff_tokens": float(known.sum()),
        # NeMo-RL's token_mult_prob_error: the token mean of exp(|dlogp|) (nemo_rl/algorithms/loss_functions.py)
        "logp_mult_sum": float((torch.exp(diff) * known).sum()),
    }


def alignment_metrics(sums: dict[str, float], diff_max: float) -> dict[str, float]:
    """``rollout/logp_diff_mean|max`` and ``rollout/token_mult_prob_error`` from (reduced) :func:`alignment_sums`."""
    tokens = sums["logp_diff_tokens"]
    return {
        "rollout/logp_diff_mean": sums["logp_diff_sum"] / max(tokens, 1.0),
        "rollout/logp_diff_max": diff_max,
        "rollout/token_mult_prob_error": sums["logp_mult_sum"] / tokens if tokens else 1.0,
    }


def alignment_stop_reason(metrics: dict[str, float], step: int, max_gap: float | None) -> str:
    """Why the run must stop after ``step`` because the rollout engine and the trainer disagree ("" if not).

    ``rollout.max_logp_gap`` bounds the mean |log pi_rollout - log pi_trainer| of a step's rollouts, which the
    engine generated right after the last weight push: above it every importance ratio is wrong.
    """
    gap = metrics.get("rollout/logp_diff_mean", 0.0)
    if max_gap is None or gap <= max_gap:
        return ""
    return (
        f"rollout.max_logp_gap={max_gap} exceeded at step {step}: mean |logp_rollout - logp_trainer| = {gap:.4g} "
        f"(max {metrics.get('rollout/logp_diff_max', float('nan')):.4g}, token_mult_prob_error "
        f"{metrics.get('rollout/token_mult_prob_error', float('nan')):.4g}). Check that the weight push landed "
        "(push/ metrics, a verify error), the engine's dtype and LM-head precision against the trainer's "
        "(model.fp32_lm_head), the sampling temperature the engine reports log-probs at, and MoE routing "
        "(rollout.routing_replay); tools/compare_engines.py shows the first layer where they part"
    )


class GRPOTrainer:
    def __init__(
        self,
        cfg: Config,
        policy: MegatronEngine,
        engine: RolloutEngine,
        scorer: RewardScorer,
        tokenizer,
        sampler: PromptSampler,
    ) -> None:
        self.cfg, self.policy, self.engine, self.scorer = cfg, policy, engine, scorer
        self.tokenizer, self.sampler = tokenizer, sampler
        self.objective = build_objective(cfg, policy.device)  # algo.loss: GRPO and its variants by default
        self.advantages = ADVANTAGES.get(cfg.algo.advantage)  # algo.advantage: group-relative by default

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        if o.warmup_steps and step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        return o.lr

    def step(self, step: int) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algo
        timer = StepTimer()
        t_start = time.perf_counter()

        # 1. prompts: this rank's share of the step's questions, each repeated G times
        problems = self.sampler.batch(step)
        prompts = [encode_prompt(self.tokenizer, p.question, cfg.data.template) for p in problems]
        prompts = [p for p in prompts for _ in range(a.group_size)]
        golds = [p.answer for p in problems for _ in range(a.group_size)]

        # 2. rollout on the colocated engine (its memory is only held while it generates)
        s = cfg.rollout.sampling
        offload = cfg.train.offload_optimizer_during_rollout
        with timer.stage("generation"):
            if offload:
                self.policy.offload_for_rollout()  # optimizer state to host, grad buffers freed
            try:
                self.engine.resume_memory()
                params = SamplingParams(s.temperature, s.top_p, s.top_k, s.max_new_tokens, seed=cfg.train.seed + step)
                rollouts = self.engine.generate(prompts, params)
                mem = memory_metrics(self.policy.device, "generation")  # while the engine holds its memory
                self.engine.release_memory()
            finally:  # also when the engine fails: the policy stays whole for the checkpoint of a stop
                if offload:
                    self.policy.onload_for_training()

        # 3. rule-based rewards: accuracy + format, in worker processes with a hard timeout
        with timer.stage("reward"):
            texts = [self.tokenizer.decode(r.response_ids) for r in rollouts]
            rewards = self.scorer.score(texts, golds)
        sampled: dict[str, float] = {}
        if a.dynamic_sampling == "resample":  # DAPO proper: more groups until enough of them carry a signal
            problems, rollouts, rewards, sampled = self._resample(step, problems, rollouts, rewards, timer)
        total = torch.tensor(rewards.total, dtype=torch.float32)

        # 4. group-relative advantages; DAPO's dynamic sampling masks groups that carry no signal
        adv = self.advantages(total, a)
        batch = build_token_batch(rollouts, self.tokenizer.pad_id, self.policy.seq_multiple)
        if a.dynamic_sampling not in ("none", False):  # mask | resample (False / True: the field's former bools)
            informative = informative_groups(total, a.group_size)
            batch.mask *= informative.repeat_interleave(a.group_size).float().unsqueeze(1)
            sampled["rollout/informative_groups"] = self.policy.reduce_metrics({"g": float(informative.sum())})["g"]
        batch.advantages = adv.unsqueeze(1) * batch.mask

        # 5. log-probs of the sampled tokens at the loss's temperature: old policy (recomputed) and reference
        with timer.stage("logprobs"):
            batch.old_logp, _ = self.policy.compute_logprobs(batch, self.objective.temperature)
            if a.beta > 0:
                batch.ref_logp, _ = self.policy.compute_logprobs(batch, self.objective.temperature, reference=True)
        diff, known = rollout_logprob_gap(rollouts, batch, self.policy.is_last_stage)
        mem.update(memory_metrics(self.policy.device, "logprobs"))

        # 6. loss + optimizer: num_minibatches optimizer steps over the rollout (groups stay whole); a
        #    minibatch without a loss token on any rank (DAPO dropped every group) is skipped and counted
        with timer.stage("training"):
            order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(cfg.train.seed + step))
            train_metrics: list[dict[str, float]] = []
            for chunk in order.chunk(a.num_minibatches):
                rows = (chunk.unsqueeze(1) * a.group_size + torch.arange(a.group_size)).reshape(-1)
                minibatch = batch.select(rows)
                train_metrics.append(self.policy.forward_backward(minibatch, self.objective, self.lr_at(step)))
        mem.update(memory_metrics(self.policy.device, "training"))

        # 7. weight sync to the rollout engine (HF-named tensors); periodic reference reset (R1-Zero: every 400)
        with timer.stage("weight_update"):
            self.engine.update_weights(self.policy.weights)
            if a.ref_reset_every and (step + 1) % a.ref_reset_every == 0:
                self.policy.reset_reference()

        wall = time.perf_counter() - t_start
        return {
            **self._metrics(step, rewards, rollouts, batch, diff, known, train_metrics, timer, wall),
            **mem,
            **sampled,
        }

    def _resample(self, step: int, problems: list[Problem], rollouts: list[Rollout], rewards: RewardBatch, timer):
        """DAPO's over-sampling (``algo.dynamic_sampling=resample``): rounds of extra prompts (round r: the
        sampler's ``batch(step, r)``, so a resumed run draws the same) until every rank holds its share of
        ``rollout.prompts_per_step`` informative groups, for at most ``algo.max_sample_rounds`` rounds.

        All ranks run the same number of rounds (an all-reduce of "still short" per round: generation with expert
        parallelism is collective). Informative groups are kept in round order; a rank still short at the cap
        fills up with uninformative groups, which the mask then drops. Returns the chosen (problems, rollouts,
        rewards) and ``rollout/sample_rounds``.
        """
        cfg, g, s = self.cfg, self.cfg.algo.group_size, self.cfg.rollout.sampling
        rounds = [(problems, rollouts, rewards, informative_groups(torch.tensor(rewards.total), g).tolist())]
        while len(rounds) < cfg.algo.max_sample_rounds and self.policy.reduce_max(
            float(sum(sum(r[3]) for r in rounds) < len(problems))  # this rank is short of informative groups
        ):
            extra = self.sampler.batch(step, round=len(rounds))
            prompts = [encode_prompt(self.tokenizer, p.question, cfg.data.template) for p in extra for _ in range(g)]
            params = SamplingParams(s.temperature, s.top_p, s.top_k, s.max_new_tokens, cfg.train.seed + step)
            with timer.stage("generation"):  # stages 2 and 3 of step, on the extra prompts
                self.engine.resume_memory()
                rolls = self.engine.generate(prompts, replace(params, seed=params.seed + 100_003 * len(rounds)))
                self.engine.release_memory()
            with timer.stage("reward"):
                texts = [self.tokenizer.decode(r.response_ids) for r in rolls]
                rw = self.scorer.score(texts, [p.answer for p in extra for _ in range(g)])
            rounds.append((extra, rolls, rw, informative_groups(torch.tensor(rw.total), g).tolist()))
        groups = [  # (no signal, problem, its G rollouts, its G rewards as (accuracy, format, total))
            (
                not ok,
                p,
                rolls[i * g : (i + 1) * g],
                [f[i * g : (i + 1) * g] for f in (rw.accuracy, rw.format, rw.total)],
            )
            for ps, rolls, rw, oks in rounds
            for i, (p, ok) in enumerate(zip(ps, oks))
        ]
        chosen = sorted(groups, key=lambda grp: grp[0])[: len(problems)]  # stable: informative first, round order
        picked = RewardBatch(
            *([x for c in chosen for x in c[3][f]] for f in range(3)),
            num_timeouts=sum(r[2].num_timeouts for r in rounds),
            num_errors=sum(r[2].num_errors for r in rounds),
        )
        rolls = [r for c in chosen for r in c[2]]
        return [c[1] for c in chosen], rolls, picked, {"rollout/sample_rounds": float(len(rounds))}

    def _metrics(self, step, rewards, rollouts, batch, diff, known, train_metrics, timer, wall) -> dict[str, float]:
        n = len(rollouts)
        lengths = [len(r.response_ids) for r in rollouts]
        local = {
            "n": n,
            "reward": sum(rewards.total),
            "accuracy": sum(rewards.accuracy),
            "format": sum(rewards.format),
            "response_len": sum(lengths),
            "finished": sum(r.finished for r in rollouts),
            "reward_timeouts": rewards.num_timeouts,
            "reward_errors": rewards.num_errors,
            **alignment_sums(diff, known),
        }
        g = self.policy.reduce_metrics(local)
        logp_diff_max = self.policy.reduce_max(float(diff.max()) if diff.numel() else 0.0)
        out = {
            "reward/mean": g["reward"] / g["n"],
            "reward/accuracy": g["accuracy"] / g["n"],
            "reward/format": g["format"] / g["n"],
            "reward/timeouts": g["reward_timeouts"],
            "reward/errors": g["reward_errors"],
            "response/length_mean": g["response_len"] / g["n"],
            "response/finished_frac": g["finished"] / g["n"],
            **self.objective.metrics.summarize(train_metrics),
            # the step guard skipped an optimizer step (non-finite loss / gradient): train.max_bad_steps in a row stop
            "train/step_skipped": float(any(not m.get("update_ok", 1.0) for m in train_metrics)),
            "train/lr": self.lr_at(step),
            **alignment_metrics(g, logp_diff_max),
        }
        for name, sec in timer.times.items():
            out[f"time/{name}"] = sec
        out["time/step"] = wall
        out.update(getattr(self.engine, "last_push_metrics", None) or {})  # push/: bytes, GB/s, the stage split
        total_tokens = float(
            self.policy.reduce_metrics({"t": float(batch.tokens.ne(self.tokenizer.pad_id).sum())})["t"]
        )
        out["perf/tokens_per_s"] = total_tokens / wall
        out["perf/gen_tokens_per_s"] = g["response_len"] / max(timer.times.get("generation", 1e-9), 1e-9)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, problems: list[Problem], samples: int = 1) -> dict[str, float]:
        """Held-out accuracy (greedy, and the mean over ``samples`` answers at the rollout's sampling: pass@1)
        plus ``eval.sets``' other sets, through the one evaluator, r1mega.eval.runner (keys: eval/training.py)."""
        from r1mega.eval.runner import evaluate
        from r1mega.eval.training import training_metrics, training_sets, training_settings

        sets = training_sets(self.cfg, problems)
        greedy, sampled = (
            evaluate(self.engine, self.tokenizer, self.scorer, sets, training_settings(self.cfg, samples, g))
            for g in (True, False)
        )
        return training_metrics(greedy, sampled)
