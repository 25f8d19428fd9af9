"""Rollouts from megatron-core's own inference engine, in-process, on the trainer's weights.

The engine wraps the very GPTModel the optimizer updates, so it is colocated by construction and a
weight update is free. It uses megatron's static-batching engine: the dynamic engine needs flash-attn
(CUDA-only), and the static one runs on every device and parallel layout (TP, PP, EP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines import StaticInferenceEngine
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.sampling_params import SamplingParams as MSampling
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from r1mega.config import Config, MegatronRolloutConfig
from r1mega.model.builder import padded_vocab_size
from r1mega.rollout.base import HFWeights, NonFiniteError, Rollout, SamplingParams, WeightSource
from r1mega.routing_replay import record_routing


def _device(model) -> torch.device:
    return next(model.parameters()).device


class MegatronRolloutEngine:
    settings_type = MegatronRolloutConfig

    @classmethod
    def from_config(cls, cfg: Config, weights: HFWeights, tokenizer) -> MegatronRolloutEngine:
        """The engine on the trainer's GPTModel (``weights.model``): shared, so weight updates are free."""
        r = cfg.rollout
        max_seq = r.max_seq_len or cfg.data.max_prompt_len + r.sampling.max_new_tokens
        vocab = padded_vocab_size(weights.vocab_size, cfg.model, cfg.parallel.tp)
        return cls(weights.model, tokenizer, vocab, r.max_batch_size, max_seq, record_routing=r.routing_replay)

    def __init__(
        self,
        model,
        tokenizer,
        padded_vocab_size: int,
        max_batch_size: int,
        max_seq_len: int,
        record_routing: bool = False,
    ) -> None:
        self.model = model  # the unwrapped GPTModel shared with the trainer
        self.tokenizer = tokenizer
        self.padded_vocab_size = padded_vocab_size
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.record_routing = record_routing  # rollout.routing_replay: fill Rollout.routed_experts
        self._engine = None

    # -- engine construction (lazy: released memory is rebuilt on the next generate) --
    def _build(self):
        cfg = self.model.config
        wrapper_cfg = InferenceWrapperConfig(
            hidden_size=cfg.hidden_size,
            params_dtype=cfg.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # never split the batch for PP
            padded_vocab_size=self.padded_vocab_size,
            inference_max_requests=self.max_batch_size,
            inference_max_seq_length=self.max_seq_len,
        )
        ctx = StaticInferenceContext(max_batch_size=self.max_batch_size, max_sequence_length=self.max_seq_len)
        wrapped = GPTInferenceWrapper(self.model, wrapper_cfg, ctx)
        controller = TextGenerationController(inference_wrapped_model=wrapped, tokenizer=self.tokenizer)
        return StaticInferenceEngine(
            text_generation_controller=controller, max_batch_size=self.max_batch_size, legacy=True
        )

    @contextlib.contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Eval mode, bf16 GEMMs, and sequence parallelism off where megatron's static engine refuses it."""
        cfg = self.model.config
        toggle_sp = cfg.sequence_parallel and not (
            cfg.tensor_model_parallel_size > 1 and cfg.expert_model_parallel_size > 1
        )
        was_training, fp8 = self.model.training, cfg.fp8
        self.model.eval()
        # FP8 trains, bf16 generates (as NeMo-RL's FP8 recipe): decode batches have token counts
        # that FP8 GEMMs cannot take, and the rollout/trainer log-prob gap is logged every step.
        cfg.fp8 = None
        if toggle_sp:
            set_model_to_sequence_parallel(self.model, False)
        try:
            yield
        finally:
            if toggle_sp:
                set_model_to_sequence_parallel(self.model, True)
            cfg.fp8 = fp8
            self.model.train(was_training)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Generate on this data-parallel rank's prompts.

        With expert parallelism every forward pass is a collective across data-parallel ranks (the
        token all-to-all), and the static engine stops when its own batch is done: ranks would fall
        out of step. So EP runs generate the union of all ranks' prompts and keep their own share.
        """
        dp = parallel_state.get_data_parallel_group()
        if self.model.config.expert_model_parallel_size == 1 or dist.get_world_size(dp) == 1:
            return self._generate(prompts, params)
        shards: list = [None] * dist.get_world_size(dp)
        dist.all_gather_object(shards, prompts, group=dp)
        outs = self._generate([p for shard in shards for p in shard], params)
        start = sum(len(shard) for shard in shards[: dist.get_rank(dp)])
        return outs[start : start + len(prompts)]

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if self._engine is None:
            self._engine = self._build()
        if params.seed is not None:
            self._engine.controller.sampling_rng.manual_seed(params.seed)
        sp = MSampling(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=0.0 if params.top_p >= 1.0 else params.top_p,  # megatron: 0 = off
            return_log_probs=True,
            num_tokens_to_generate=params.max_new_tokens,
        )
        requests = [
            InferenceRequest(request_id=i, prompt="", sampling_params=sp, prompt_tokens=list(p))
            for i, p in enumerate(prompts)
        ]
        _check_finite_weights(self.model)
        with self._inference_mode():
            try:
                done = self._engine.generate(inference_requests=requests)
            except RuntimeError as e:  # finite weights, yet an overflow in the forward pass reached the sampler
                if "probability tensor contains" not in str(e):
                    raise
                raise NonFiniteError(f"non-finite logits in sampling although the weights are finite ({e})") from e
        done = sorted(done, key=lambda r: r.request_id)
        eos = self.tokenizer.eos_id
        out = []
        for req, prompt in zip(done, prompts):
            ids = [int(t) for t in req.generated_tokens]
            # megatron's static engine reports log-probs of the untempered distribution: at a sampling
            # temperature != 1 the logged rollout/trainer gap includes that difference.
            lps = [float(x) for x in req.generated_log_probs][: len(ids)]
            lps += [float("nan")] * (len(ids) - len(lps))  # megatron omits the last one when a batch ends early
            # megatron stops a sequence at EOS without returning it (nor its log-prob); the policy must
            # learn to stop, so the EOS goes back into the response, its rollout log-prob unknown (NaN).
            finished = len(ids) < params.max_new_tokens
            if finished:
                ids, lps = ids + [eos], lps + [float("nan")]
            out.append(Rollout(list(prompt), ids, lps, finished=finished))
        if self.record_routing:  # the static engine's controller exposes no router choices: one RECORD forward
            with self._inference_mode():
                routes = record_routing(self.model, [r.prompt_ids + r.response_ids for r in out], _device(self.model))
            for r, routed in zip(out, routes):
                r.routed_experts = routed
        return _broadcast_from_model_parallel_src(out)

    def update_weights(self, source: WeightSource) -> None:
        """Nothing to copy: the engine reads the trainer's parameters directly (``source`` is not drawn)."""

    def release_memory(self) -> None:
        self._engine = None  # drops the KV cache held by the static context
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """The engine is rebuilt lazily by the next generate()."""

    def shutdown(self) -> None:
        self.release_memory()


def _check_finite_weights(model) -> None:
    """Sampling checks its input: non-finite weights make every logit NaN, which torch.multinomial reports without
    a cause and greedy decoding would not report at all (collective: every rank raises, or none)."""
    from r1mega.checkpoint import model_is_finite

    if not model_is_finite(model):
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()][:3]
        raise NonFiniteError(
            f"non-finite logits: the policy weights are non-finite ({', '.join(bad) or 'on another rank'}); resume "
            "from a finite checkpoint (train.save_dir's latest is one) with a lower optim.lr"
        )


def _broadcast_from_model_parallel_src(rollouts: list[Rollout]) -> list[Rollout]:
    """Make every rank of a model-parallel group hold exactly the first rank's samples.

    TP / PP ranks sample from identical logits with identical seeds, but a bitwise difference in a
    reduction could make one rank sample a different token: a silent divergence of the batch.
    """

    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return rollouts
    obj = [rollouts]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0), group=group)
    return obj[0]
