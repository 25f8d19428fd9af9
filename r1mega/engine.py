"""The megatron training engine: policy + DDP + distributed optimizer + reference model + pipeline driver.

It knows nothing about any loss: :meth:`MegatronEngine.forward_backward` runs one optimizer step of whatever
:class:`~r1mega.objectives.base.Objective` it is given, :meth:`MegatronEngine.forward_only` runs a function
of the logits without gradients. Every forward pass goes through megatron's pipeline schedules
(``get_forward_backward_func``), so the same code runs with any TP / PP / EP / DP layout: log-probs and
losses exist on the last pipeline stage, and :meth:`MegatronEngine.reduce_metrics` brings their metric sums
to every rank.

megatron is imported at the top here: this module is only imported once the runtime is being set up (see
the import rule in :mod:`r1mega.parallel.runtime`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega import packing
from r1mega.batch import TokenBatch
from r1mega.config import Config
from r1mega.grpo.fused_lm_head import check_objective, linear_token_logprobs
from r1mega.grpo.logprobs import (
    choose_logprob_impl,
    fused_token_logprobs,
    kernel_token_logprobs,
    kernels_available,
    token_logprobs,
)
from r1mega.model.builder import build_gpt_model, hidden_states_out, output_weight, padded_vocab_size
from r1mega.objectives.base import Objective
from r1mega.packing import PackedLayout
from r1mega.parallel.runtime import Runtime
from r1mega.rollout.base import HFWeights

Microbatch = dict[str, torch.Tensor]


def use_fp32_lm_head(model) -> None:
    """Compute the output layer (so the logits and every log-prob) in fp32 from the bf16 hidden states / weights.

    bf16 logits of a large vocabulary alone put two bf16 engines ~0.07 nats per token from the exact forward
    (docs/perf/sglang.md, SmolLM2); slime and verl run this layer in fp32 for that reason (SGLang's
    ``enable_fp32_lm_head``, passed by the SGLang engine under the same switch). The weight stays a bf16
    parameter: the cast is inside autograd, so its gradient (and megatron's grad hooks) are unchanged.
    """
    head = getattr(model, "output_layer", None)
    if head is None:  # not the last pipeline stage
        return

    def to_fp32(module, args, kwargs):
        weight = kwargs.get("weight")
        kwargs["weight"] = (module.weight if weight is None else weight).float()
        return (args[0].float(), *args[1:]), kwargs

    head.register_forward_pre_hook(to_fp32, with_kwargs=True)


def optimizer_config(cfg: Config, params_dtype: torch.dtype) -> OptimizerConfig:
    """megatron's OptimizerConfig from optim.* (Adam; the distributed optimizer when parallel.* says so).

    optim.cpu_offload: megatron's HybridDeviceOptimizer keeps ``offload_fraction`` of the optimizer states on the
    CPU and steps them there (AdamW mode, which is Adam at weight_decay 0). GPU only: it maps CUDA parameters to
    CPU copies (a CPU parameter has none), and needs separate fp32 main params (bf16, or no distributed optimizer).
    """
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.train.precision == "bf16",
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        optimizer_cpu_offload=o.cpu_offload,
        optimizer_offload_fraction=o.offload_fraction if o.cpu_offload else 0.0,
    )


class MegatronEngine:
    def __init__(self, cfg: Config, runtime: Runtime, vocab_size: int) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.device = runtime.device
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.model, cfg.parallel.tp)
        self.model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, vocab_size, self.device)
        if cfg.train.fp32_lm_head:
            use_fp32_lm_head(self.model)
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
        self.optimizer = get_megatron_optimizer(optimizer_config(cfg, tcfg.params_dtype), [self.ddp])
        self.ref_model = None
        if cfg.algo.beta > 0:  # the KL term needs a frozen reference
            self.ref_model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, vocab_size, self.device)
            self.ref_model.requires_grad_(False)
            if cfg.train.fp32_lm_head:
                use_fp32_lm_head(self.ref_model)
            self.reset_reference()
        self._mask_cache: dict[int, torch.Tensor] = {}
        self._replays = self._routing_replays() if cfg.rollout.routing_replay else {}
        # The weights rollout engines pull after each update, as (HF name, tensor): they never see the model.
        self.weights = HFWeights(self.model, cfg.model, vocab_size)

    # ------------------------------------------------------------------ pipeline driver
    @property
    def is_last_stage(self) -> bool:
        return parallel_state.is_pipeline_last_stage()

    @property
    def seq_multiple(self) -> int:
        """Sequence lengths must be a multiple of this: sequence parallelism splits S over TP ranks, and TE's FP8
        GEMMs need every rank's token count divisible by 16 (its alignment for FP8 recipes)."""
        tp = self.cfg.parallel.tp if self.model.config.sequence_parallel else 1
        return tp * (16 if self.cfg.train.fp8 else 1)

    def _attention_mask(self, s: int) -> torch.Tensor | None:
        """Causal mask for megatron's local attention (True = masked); TE builds its own."""
        if self.device.type == "cuda":
            return None
        if s not in self._mask_cache:
            self._mask_cache[s] = torch.ones(1, 1, s, s, dtype=torch.bool, device=self.device).triu(1)
        return self._mask_cache[s]

    def _packed_microbatches(self, batch: TokenBatch) -> list[tuple[Microbatch, PackedLayout]]:
        """THD microbatches of about train.max_tokens_per_microbatch tokens (r1mega/packing.py); every
        data-parallel rank runs the same number of them (EP all-to-alls), pipelines need one shape."""
        budget = self.cfg.train.max_tokens_per_microbatch
        n_local = len(packing.plan_bins(packing.row_lengths(batch.mask), budget))
        n = int(self.reduce_max_dp(n_local))
        packed = packing.pack_batch(batch, budget, self.seq_multiple, self.cfg.parallel.pp > 1, num_bins=n)
        return [({k: v.to(self.device, non_blocking=True) for k, v in mb.items()}, lay) for mb, lay in packed]

    def reduce_max_dp(self, value: float) -> float:
        dp = parallel_state.get_data_parallel_group()
        if dist.get_world_size(dp) == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dp)
        return float(t)

    def _microbatches(self, batch: TokenBatch) -> list[tuple[Microbatch, PackedLayout | None]]:
        if self.cfg.train.max_tokens_per_microbatch:
            return self._packed_microbatches(batch)
        mbs = self.cfg.train.micro_batch_size
        fields = batch.fields()
        n = batch.size
        out = []
        for start in range(0, n, mbs):
            mb = {k: v[start : start + mbs].to(self.device, non_blocking=True) for k, v in fields.items()}
            short = mbs - mb["tokens"].shape[0]
            if short > 0 and n > mbs:  # pipeline schedules need equal microbatch shapes: pad with masked rows
                mb = {k: torch.cat([v, v.new_zeros((short, *v.shape[1:]))]) for k, v in mb.items()}
            out.append((mb, None))
        return out

    def _run(self, model, microbatches: list[tuple[Microbatch, PackedLayout | None]], loss_fn, forward_only: bool):
        s = microbatches[0][0]["tokens"].shape[1]
        mask = self._attention_mask(s)
        pos = torch.arange(s, device=self.device).unsqueeze(0)

        replay = self._replays.get(model)

        def forward_step(data_iterator, m):
            mb, layout = next(data_iterator)
            if replay is not None and "routed_experts" in mb:
                replay.replay(mb["routed_experts"])  # rollout.routing_replay: this microbatch's experts
            if layout is None:
                out = m(mb["tokens"], pos.expand_as(mb["tokens"]), mask)
            else:  # packed: the attention masks per sequence from cu_seqlens, positions restart per sequence
                out = m(mb["tokens"], mb["position_ids"], None, packed_seq_params=layout.params(self.device))
            return out, partial(loss_fn, mb)

        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=[model],
                num_microbatches=len(microbatches),
                seq_length=s,
                micro_batch_size=microbatches[0][0]["tokens"].shape[0],
                forward_only=forward_only,
            )
        finally:
            if replay is not None:
                replay.off()

    def _routing_replays(self) -> dict:
        """rollout.routing_replay: megatron's RouterReplay on the policy's and the reference's routers, by the
        module ``_run`` is given (r1mega/routing_replay.py)."""
        from r1mega.config import ConfigError
        from r1mega.routing_replay import RoutingReplay

        if not self.cfg.model.is_moe:
            raise ConfigError("rollout.routing_replay=true needs an MoE model (model.num_experts > 0)")
        out = {self.ddp: RoutingReplay(self.model)}
        if self.ref_model is not None:
            out[self.ref_model] = RoutingReplay(self.ref_model)
        return out

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def forward_only(
        self, batch: TokenBatch, fn: Callable[[Microbatch, torch.Tensor], dict[str, torch.Tensor]], reference=False
    ) -> dict[str, torch.Tensor] | None:
        """``fn(microbatch, logits)`` -> per-target-token tensors [b, S-1], concatenated over the batch's rows.

        The policy (or the reference) runs in eval mode. None on pipeline stages other than the last. Packed
        microbatches give [1, T-1] tensors, put back into the batch's rows (0 where a row did not run).
        """
        model = self.ref_model if reference else self.ddp

        def loss_fn(mb, logits):
            return logits.new_zeros(()), torch.tensor(1, dtype=torch.int), fn(mb, logits)

        was_training = model.training
        model.eval()
        microbatches = self._microbatches(batch)
        try:
            outs = self._run(model, microbatches, loss_fn, forward_only=True)
        finally:
            model.train(was_training)
        if not self.is_last_stage:
            return None
        if microbatches[0][1] is not None:
            return packing.unpack(outs, [lay for _, lay in microbatches], batch.size, batch.mask.shape[1])
        return {k: torch.cat([o[k] for o in outs])[: batch.size] for k in outs[0]}

    def compute_logprobs(
        self, batch: TokenBatch, temperature: float, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy) [B, S-1] of the batch's tokens at ``temperature``, under the policy or the reference.

        Only meaningful on the last pipeline stage (zeros elsewhere): that is where the loss runs. On the GPU
        (grpo.logprobs.choose_logprob_impl) r1mega_kernels' logprob_entropy reads the logits once; with
        ``train.fused_lm_head`` the model stops before its output layer and the fused linear + log-prob kernel
        makes the logits a chunk at a time, so [T, V] logits never exist.
        """
        impl = choose_logprob_impl(
            self.cfg.algo.loss_impl, self.device.type == "cuda", kernels_available(), self.cfg.train.fused_lm_head
        )
        gpt = self.ref_model if reference else self.model

        def fn(mb, out):
            out, targets = out[:, :-1], mb["tokens"][:, 1:]
            if impl == "fused":
                logp, ent = fused_token_logprobs(out, output_weight(gpt), targets, temperature)
            elif impl == "kernel":
                logp, ent = kernel_token_logprobs(out, targets, temperature)
            else:
                logp, ent = token_logprobs(out, targets, temperature, with_entropy=True)
            return {"logp": logp, "entropy": ent}

        with hidden_states_out(gpt) if impl == "fused" else contextlib.nullcontext():
            out = self.forward_only(batch, fn, reference)
        if out is None:
            z = torch.zeros(*batch.mask.shape, device=self.device)
            return z, z.clone()
        return out["logp"], out["entropy"]

    def forward_backward(self, batch: TokenBatch, objective: Objective, lr: float) -> dict[str, float]:
        """One optimizer step of ``objective`` over ``batch`` (all its microbatches); metric sums over all ranks.

        Returns ``loss`` (summed loss / summed denominator), ``grad_norm``, ``update_ok`` (0: the step guard
        skipped a non-finite step, :meth:`_step_if_finite`) and the objective's metric sums; or ``{"skipped": 1.0}``
        when no rank has a loss token (e.g. DAPO dropped every group): there is nothing to learn, and megatron
        would divide by a zero token count.
        """
        if not self.reduce_metrics({"tokens": float(batch.mask.sum())})["tokens"]:
            return {"skipped": 1.0}

        fused = self.cfg.train.fused_lm_head_train  # the model returns hidden states; logits only per chunk
        check_objective(objective, fused)

        def loss_fn(mb, out):
            if fused:
                w, targets = output_weight(self.model), mb["tokens"][:, 1:]
                logp, ent = linear_token_logprobs(out[:, :-1], w, targets, objective.temperature)
                loss_sum, denom, metrics = objective.loss_from_logprobs(mb, logp, ent)
            else:
                loss_sum, denom, metrics = objective.loss(mb, out)
            metrics = {**metrics, "loss_sum": loss_sum.detach(), "denom": denom}
            return loss_sum, denom.to(torch.int), metrics

        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        with hidden_states_out(self.model) if fused else contextlib.nullcontext():
            outs = self._run(self.ddp, self._microbatches(batch), loss_fn, forward_only=False)
        ok, grad_norm = self._step_if_finite(outs)
        sums = {k: sum(float(o[k]) for o in outs) for k in outs[0]} if outs else {}
        sums = self.reduce_metrics(sums)
        if sums.get("denom"):
            sums["loss"] = sums.pop("loss_sum") / sums.pop("denom")
        sums["grad_norm"] = grad_norm
        sums["update_ok"] = float(bool(ok))
        return sums

    def _step_if_finite(self, outs: list[dict]) -> tuple[bool, float]:
        """The step guard: ``optimizer.step()`` only when the loss and every gradient are finite on every rank.

        megatron checks for inf/NaN only with a loss scaler (fp16); in fp32 / bf16 a NaN gradient would make Adam
        write NaN into the weights and its moments (clipping does not help: ``clip_coeff < 1`` is False for NaN).
        So the local grad buffers (the whole buffer: with the distributed optimizer it still holds this rank's own
        contribution outside its reduced shard) and the loss are checked, the flag is agreed over all ranks, and a
        bad step leaves weights and optimizer state untouched: (False, nan). Costs one read of the gradients.
        """
        # sums: a NaN or inf anywhere makes them non-finite, without a buffer-sized temporary (isfinite would be one)
        sums = [torch.as_tensor(o["loss_sum"], device=self.device).sum().float() for o in outs]
        sums += [b.grad_data.sum().float() for b in self.ddp.buffers + self.ddp.expert_parallel_buffers]
        flag = (~torch.stack(sums).isfinite().all() if sums else torch.tensor(False)).to(self.device).float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # TP / PP / EP / DP: every rank skips, or none
        if flag.item():
            return False, float("nan")
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    # ------------------------------------------------------------------ collectives and bookkeeping
    def reduce_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum metric sums over data-parallel ranks and bring them from the last pipeline stage to all."""
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

    def reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    # ------------------------------------------------------------------ memory hand-over to the rollout engine
    def offload_for_rollout(self) -> None:
        """train.offload_optimizer_during_rollout: the optimizer state (and fp32 main params) to host memory and
        the grad buffers' storage freed, through megatron-core's own RL hooks (``offload_to_cpu``,
        ``offload_grad_buffers``); the weights stay (the megatron engine generates with them, SGLang has a copy)."""
        on_gpu = self.device.type == "cuda"
        self.optimizer.offload_to_cpu()
        self.ddp.offload_grad_buffers(synchronize=on_gpu, empty_cache=on_gpu)

    def onload_for_training(self) -> None:
        """Undo :meth:`offload_for_rollout` bit for bit (grad buffers come back zeroed, as each step starts)."""
        self.optimizer.restore_from_cpu()
        self.ddp.restore_grad_buffers(synchronize=self.device.type == "cuda")

    def reset_reference(self) -> None:
        """Copy the current policy weights into the reference model (R1-Zero: every 400 steps)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict(), strict=True)
