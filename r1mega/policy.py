"""The megatron side of training: policy + DDP + distributed optimizer + reference model.

Every forward pass goes through megatron's pipeline schedules (``get_forward_backward_func``), so the
same code runs with any TP / PP / EP / DP layout: log-probs and losses exist on the last pipeline
stage, and :meth:`Policy.reduce_metrics` brings their metrics to every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from r1mega.config import Config
from r1mega.grpo.logprobs import token_logprobs
from r1mega.grpo.loss import LossSettings, aggregation_weights, grpo_loss
from r1mega.model.builder import build_gpt_model, padded_vocab_size
from r1mega.parallel.runtime import Runtime


@dataclass
class TokenBatch:
    """Prompt + response token rows, right-padded, and per-target-token tensors."""

    tokens: torch.Tensor  # [B, S] int64
    mask: torch.Tensor  # [B, S-1] 1.0 on response tokens (the ones the loss sees)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor) -> TokenBatch:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TokenBatch(
            pick(self.tokens), pick(self.mask), pick(self.old_logp), pick(self.ref_logp), pick(self.advantages)
        )


def pad_rows(rows: list[list[int]], pad_id: int, multiple: int = 1) -> torch.Tensor:
    """Right-pad token rows into [B, S], S rounded up to ``multiple`` (sequence parallelism splits S)."""
    s = max(len(r) for r in rows)
    s = -(-s // multiple) * multiple
    out = torch.full((len(rows), s), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Policy:
    def __init__(self, cfg: Config, runtime: Runtime, vocab_size: int) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.runtime = cfg, runtime
        self.device = runtime.device
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.model, cfg.parallel.tp)
        self.model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, vocab_size, self.device)
        tcfg = self.model.config
        self.ddp = DistributedDataParallel(
            config=tcfg,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            ),
            module=self.model,
        )
        # finalize_model_grads: DP/TP/PP grad reductions, the per-token-loss normalisation, and the
        # aux-loss-free router expert-bias update (DeepSeek-V3) from the step's expert loads.
        tcfg.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=cfg.train.precision == "bf16",
                params_dtype=tcfg.params_dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            ),
            [self.ddp],
        )
        self.ref_model = None
        if cfg.algo.beta > 0:
            self.ref_model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, vocab_size, self.device)
            self.ref_model.requires_grad_(False)
            self.reset_reference()
        self._mask_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ pipeline helpers
    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage()

    def _attention_mask(self, s: int) -> torch.Tensor | None:
        """Causal mask for megatron's local attention (True = masked); TE builds its own."""
        if self.device.type == "cuda":
            return None
        if s not in self._mask_cache:
            self._mask_cache[s] = torch.ones(1, 1, s, s, dtype=torch.bool, device=self.device).triu(1)
        return self._mask_cache[s]

    def _microbatches(self, batch: TokenBatch) -> list[dict[str, torch.Tensor]]:
        mbs = self.cfg.train.micro_batch_size
        fields = {"tokens": batch.tokens, "mask": batch.mask}
        for name in ("old_logp", "ref_logp", "advantages"):
            if getattr(batch, name) is not None:
                fields[name] = getattr(batch, name)
        n = batch.size
        out = []
        for start in range(0, n, mbs):
            mb = {k: v[start : start + mbs].to(self.device, non_blocking=True) for k, v in fields.items()}
            short = mbs - mb["tokens"].shape[0]
            if short > 0 and n > mbs:  # pipeline schedules need equal microbatch shapes: pad with masked rows
                mb = {k: torch.cat([v, v.new_zeros((short, *v.shape[1:]))]) for k, v in mb.items()}
            out.append(mb)
        return out

    def _run(self, model, microbatches, loss_fn: Callable, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        s = microbatches[0]["tokens"].shape[1]
        mask = self._attention_mask(s)
        pos = torch.arange(s, device=self.device).unsqueeze(0)

        def forward_step(data_iterator, m):
            mb = next(data_iterator)
            out = m(mb["tokens"], pos.expand_as(mb["tokens"]), mask)
            return out, partial(loss_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=s,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def compute_logprobs(self, batch: TokenBatch, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy) [B, S-1] of the batch's tokens under the policy or the reference.

        Only meaningful on the last pipeline stage (zeros elsewhere): that is where the loss runs.
        """
        model = self.ref_model if reference else self.ddp
        temperature = self.cfg.rollout.sampling.temperature

        def loss_fn(mb, logits):
            logp, ent = token_logprobs(logits[:, :-1], mb["tokens"][:, 1:], temperature, with_entropy=True)
            return logits.new_zeros(()), torch.tensor(1, dtype=torch.int), {"logp": logp, "entropy": ent}

        was_training = model.training
        model.eval()
        try:
            outs = self._run(model, self._microbatches(batch), loss_fn, forward_only=True)
        finally:
            model.train(was_training)
        b, s1 = batch.mask.shape
        if not self.is_last_stage:
            z = torch.zeros(b, s1, device=self.device)
            return z, z.clone()
        logp = torch.cat([o["logp"] for o in outs])[:b]
        ent = torch.cat([o["entropy"] for o in outs])[:b]
        return logp, ent

    def train_minibatch(self, batch: TokenBatch, lr: float) -> dict[str, float]:
        """One optimizer step of the GRPO loss over ``batch`` (all its microbatches)."""
        a = self.cfg.algo
        settings = LossSettings(
            a.eps_low, a.eps_high, a.beta, a.loss_agg, a.ratio_level, self.cfg.rollout.sampling.max_new_tokens
        )
        temperature = self.cfg.rollout.sampling.temperature
        use_triton = self._use_triton()

        def loss_fn(mb, logits):
            targets = mb["tokens"][:, 1:]
            lg = logits[:, :-1]
            ref = mb.get("ref_logp") if a.beta > 0 else None
            if use_triton:
                return self._triton_loss(lg, targets, mb, ref, settings, temperature)
            logp, ent = token_logprobs(lg, targets, temperature, with_entropy=True)
            loss_sum, denom, metrics = grpo_loss(logp, mb["old_logp"], ref, mb["advantages"], mb["mask"], settings)
            metrics["entropy"] = (ent * mb["mask"]).sum()
            metrics["loss_sum"], metrics["denom"] = loss_sum.detach(), denom
            return loss_sum, denom.to(torch.int), metrics

        outs = self._step(self._microbatches(batch), loss_fn, lr)
        return outs

    def sft_minibatch(self, batch: TokenBatch, lr: float) -> dict[str, float]:
        """One optimizer step of token-mean cross-entropy on the response tokens (cold-start SFT)."""

        def loss_fn(mb, logits):
            logp, _ = token_logprobs(logits[:, :-1], mb["tokens"][:, 1:], 1.0)
            m = mb["mask"]
            loss_sum = -(logp * m).sum()
            return loss_sum, m.sum().to(torch.int), {"loss_sum": loss_sum.detach(), "denom": m.sum()}

        return self._step(self._microbatches(batch), loss_fn, lr)

    def _step(self, microbatches, loss_fn, lr: float) -> dict[str, float]:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(self.ddp, microbatches, loss_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        sums = {k: sum(float(o[k]) for o in outs) for k in outs[0]} if outs else {}
        sums = self.reduce_metrics(sums)
        if sums.get("denom"):
            sums["loss"] = sums.pop("loss_sum") / sums.pop("denom")
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        sums["update_ok"] = float(bool(ok))
        return sums

    # ------------------------------------------------------------------ triton path (GPU)
    def _use_triton(self) -> bool:
        impl = self.cfg.algo.loss_impl
        if impl == "torch" or self.cfg.algo.ratio_level != "token":
            return False  # GSPO's sequence-level ratio needs a per-sequence reduction: torch path
        try:
            import r1mega_kernels
        except ImportError:
            if impl == "triton":
                raise
            return False
        ok = r1mega_kernels.available()
        if impl == "triton" and not ok:
            raise RuntimeError("algo.loss_impl=triton needs Triton with a GPU; set algo.loss_impl=torch")
        return ok and (impl == "triton" or self.device.type == "cuda")

    def _triton_loss(self, logits, targets, mb, ref, s: LossSettings, temperature: float):
        import r1mega_kernels
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.utils import VocabUtility

        tp_group = parallel_state.get_tensor_model_parallel_group()
        v_local = logits.shape[-1]
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            v_local,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        u, denom = aggregation_weights(mb["mask"], s.loss_agg, s.max_len)
        # logits stay the [b, t, V] view of the model output (the last position sliced off): the kernels read it
        # through its strides (a reshape here would copy the whole logits); per-token inputs are [b, t].
        loss_sum, stats = r1mega_kernels.grpo_loss(
            logits,
            targets,
            mb["old_logp"],
            ref,
            mb["advantages"],
            u,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            beta=s.beta if ref is not None else 0.0,
            temperature=temperature,
            tp_group=tp_group if dist.get_world_size(tp_group) > 1 else None,
            vocab_start=vocab_start,
        )
        m = mb["mask"].reshape(-1).float()
        metrics = {
            "tokens": m.sum(),
            "clip_frac": (stats.is_clipped.reshape(-1).float() * m).sum(),
            "kl": (stats.kl.reshape(-1) * m).sum(),
            "ratio": (torch.exp(stats.logp.reshape(-1) - mb["old_logp"].reshape(-1)) * m).sum(),
            "entropy": (stats.entropy.reshape(-1) * m).sum(),
            "loss_sum": loss_sum.detach(),
            "denom": denom,
        }
        return loss_sum, denom.to(torch.int), metrics

    # ------------------------------------------------------------------ bookkeeping
    def reduce_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum metric sums over data-parallel ranks and bring them from the last pipeline stage to all."""
        from megatron.core import parallel_state

        pp = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp) > 1:  # earlier stages have no loss outputs, not even the keys
            box = [sums]
            dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp)
            sums = box[0]
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=self.device)
        dp = parallel_state.get_data_parallel_group()
        if keys and dist.get_world_size(dp) > 1:
            dist.all_reduce(t, group=dp)
        return dict(zip(keys, t.tolist()))

    def reset_reference(self) -> None:
        """Copy the current policy weights into the reference model (R1-Zero: every 400 steps)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict(), strict=True)

    def reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def named_tensors(self, fmt: str = "megatron"):
        """WeightSource for rollout engines: this rank's parameters, by megatron name."""
        if fmt != "megatron":
            raise ValueError(f"weight format {fmt!r} is not supported by this policy")
        yield from self.model.named_parameters()
