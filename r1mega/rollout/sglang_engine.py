"""Rollouts from SGLang, colocated on the trainer's GPUs; weights pushed in memory after each update.

STATUS (H200, docs/perf/sglang.md): 20-step colocated GRPO on SmolLM2-135M; engine vs trainer mean |Δlogp|
0.020-0.027 (dense) and 0.013-0.016 (Qwen3-MoE, DeepSeek-V3 with routing replay), at SGLang's own bf16 floor.

Layout (one SGLang engine per trainer TP group):

- The first rank of each tensor-parallel group starts ``sglang.Engine(tp_size=TP, base_gpu_id=<its GPU>)``:
  SGLang spawns TP scheduler processes on GPUs base..base+TP-1, which are the GPUs of the trainer's TP
  group (megatron makes TP the innermost rank dimension; checked at start). Every data-parallel replica
  thus has its own engine and generates its own prompts; nothing crosses TP groups.
- The other TP ranks do not talk to SGLang: they take part in the weight export's collectives (TP / EP
  all-gathers) and receive the rollouts by broadcast from the first rank.
- Limits: PP = 1 and CP = 1 (an engine needs every layer; stages would have to ship theirs to it);
  each process must see all of its node's GPUs (torchrun's default, not one-GPU-per-task Slurm
  binding); the TP group must sit on one node; with EP, every engine receives every expert (the export
  all-gathers experts over the EP group), so each GPU holds a full TP shard of the model in SGLang,
  sized by ``rollout.mem_fraction``. The SGLang ports are spread by GPU index
  (``rollout.base_port + 100 * base_gpu_id``) so the engines of one node do not collide.

Startup: config.json for the policy's architecture (:func:`hf_config_from_model_config`) is written to a
temporary directory and SGLang starts with ``load_format="dummy"`` (random weights, no checkpoint on
disk); the real weights are pushed before the first generate. Then ``skip_tokenizer_init=True``
(token ids in and out), ``enable_memory_saver=True``, and from :class:`~r1mega.config.SGLangRolloutConfig`
(``rollout=sglang``): ``attention_backend="triton"`` (FA3 is not in the carried kernel wheel),
``sampling_backend="pytorch"``, CUDA graphs on (``rollout.disable_cuda_graph=false``), ``chunked_prefill_size``,
``enable_fp32_lm_head`` under ``train.fp32_lm_head``, ``enable_return_routed_experts`` under
``rollout.routing_replay``. ``engine_kwargs`` override any of these. A Qwen3-MoE policy with dense layers is
refused (SGLang 0.5.17 builds every Qwen3-MoE layer sparse and drops the dense layers' weights silently).

Memory cycle (SGLang's memory saver drops the *contents* of released weights):
``release_memory`` releases every tag (weights, KV cache, CUDA graphs); ``update_weights`` resumes the
weights only and pushes; ``resume_memory`` resumes the rest; ``generate`` pushes first whenever the
weights were released since the last push (e.g. after ``evaluate``) -- so a push always follows a
weight resume, as SGLang needs. Before a resume the trainer's cached blocks go back to the driver, and a resume
that cannot fit is a ``MemoryError`` naming the settings (:class:`~r1mega.memory.GpuHandover`), not a crash of
SGLang's scheduler that takes the job down without a checkpoint.

Weight push: the :class:`~r1mega.rollout.base.WeightSource` streams (HF name, tensor) groups in HF layouts
(TP / EP gathered), planned into single-dtype buckets of ``rollout.bucket_mb`` with a layer's experts together
(:mod:`r1mega.rollout.weight_push`), each sent as a ``FlattenedTensorBucket`` over CUDA IPC
(``load_format="flattened_bucket"``, ``flush_cache=False``), then one ``flush_cache()``. A bucket never splits
a layer's ``q_a_proj`` / ``kv_a_proj_with_mqa`` pair (SGLang fuses them within one call). After the first push
(and every ``rollout.verify_push_every``-th, if set) a sample is read back with ``get_weights_by_name`` (SGLang drops
unknown names silently). ``last_push_metrics``: bytes, seconds, GB/s, gather / convert / ipc_load / verify.
The engine never sees the model.

Responses: SGLang with ``skip_tokenizer_init`` returns the stop token inside ``output_ids`` and a
log-prob for every output token; if a finished answer comes back without it, it is appended (log-prob
from the engine if given, else NaN). Log-probs are SGLang's default: of the temperature-scaled
distribution before top-k / top-p truncation, which is what the trainer recomputes with
``rollout.sampling.temperature``. Seeds: each request gets its own ``sampling_seed`` (from the call's
seed, the DP rank and the request index: the G copies of a prompt must not sample alike); SGLang honours
it only under deterministic inference (``rollout.deterministic=true``).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from r1mega.config import Config, SGLangRolloutConfig
from r1mega.memory import GpuHandover
from r1mega.model.hf_export import hf_architecture, hf_config_from_model_config
from r1mega.rollout.base import Rollout, SamplingParams, WeightSource
from r1mega.rollout.sglang_io import request_seed, sampling_dict, scored_logprobs, to_rollout
from r1mega.rollout.sglang_server import import_sglang, shutdown_engine, start_engine
from r1mega.rollout.weight_push import PushStats, flattened_payloads, plan_buckets, timed

log = logging.getLogger(__name__)
# sglang 0.5.17 implements Engine.get_weights_by_name only for these (models/{llama,granite,exaone4,opt}.py);
# elsewhere it answers None for every name, so a push cannot be read back
READABLE = {"LlamaForCausalLM", "GraniteForCausalLM", "Exaone4ForCausalLM", "OPTForCausalLM"}
VERIFY_ROWS = 4  # get_weights_by_name(truncate_size): the first rows of each sampled tensor
VERIFY_SAMPLES = 16

WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
ALL_TAGS = (KV_CACHE, WEIGHTS, CUDA_GRAPH)  # sglang.srt.constants.GPU_MEMORY_ALL_TYPES


def _check_loaded(result: Any) -> None:
    """SGLang answers a weight update with (success, message) instead of raising: make a failure an error."""
    if isinstance(result, (tuple, list)) and result and result[0] is False:
        raise RuntimeError(f"rollout=sglang: SGLang refused the weight update: {result[1] if len(result) > 1 else ''}")


class SGLangRolloutEngine:
    settings_type = SGLangRolloutConfig

    @classmethod
    def from_config(cls, cfg: Config, weights: WeightSource, tokenizer) -> SGLangRolloutEngine:
        return cls(cfg, weights, tokenizer)

    def __init__(
        self,
        cfg: Config,
        weights: WeightSource,
        tokenizer,
        *,
        bucket_bytes: Optional[int] = None,
        engine_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        par = cfg.parallel
        if par.pp != 1 or par.cp != 1:
            raise ValueError(
                f"rollout=sglang needs parallel.pp=1 and parallel.cp=1 (got pp={par.pp}, cp={par.cp}): "
                "each engine needs every layer of the model"
            )
        arch = hf_architecture(cfg.model)
        if arch == "Qwen3MoeForCausalLM" and cfg.model.first_k_dense_layers > 0:
            raise ValueError(
                f"rollout=sglang cannot serve this Qwen3-MoE policy: model.first_k_dense_layers="
                f"{cfg.model.first_k_dense_layers}, but SGLang 0.5.17 builds every Qwen3-MoE layer sparse and drops "
                "the dense layers' pushed weights without an error (docs/perf/sglang.md). Use "
                "model.first_k_dense_layers=0 (as Qwen3-30B-A3B) or rollout=megatron"
            )
        if cfg.train.fp32_lm_head and cfg.rollout.server_args.get("rl_on_policy_target") is not None:
            # sglang 0.5.17 srt/layers/sampler.py; 0.018 nats from exact on SmolLM2 (docs/perf/sglang.md)
            raise ValueError(
                "rollout.server_args.rl_on_policy_target with train.fp32_lm_head=true: SGLang would compute fp32 "
                "logits, then return log-probs of those logits rounded to bf16, which the trainer's fp32 head does "
                "not reproduce. Drop one of them (rollout.deterministic=true gives batch-invariant sampling alone)"
            )
        self.arch = arch
        self.settings: SGLangRolloutConfig = cfg.rollout  # rollout=sglang (checked by build_rollout_engine)
        self.cfg, self.weights, self.tokenizer = cfg, weights, tokenizer
        self.bucket_bytes = bucket_bytes or self.settings.bucket_mb << 20
        self.engine_kwargs = {**cfg.rollout.server_args, **(engine_kwargs or {})}  # rollout.server_args, then code's
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self._tp_group, self._tp_size, self._owner_rank, self._dp_rank = None, 1, 0, 0
        if dist.is_available() and dist.is_initialized():
            self._tp_group = parallel_state.get_tensor_model_parallel_group()
            self._tp_size = dist.get_world_size(self._tp_group)
            self._owner_rank = dist.get_global_rank(self._tp_group, 0)
            self._dp_rank = parallel_state.get_data_parallel_rank()
        self.is_owner = self._tp_group is None or dist.get_rank(self._tp_group) == 0
        self._engine = None
        self._model_dir: Optional[Path] = None
        self._released: set[str] = set()
        self._handover = GpuHandover(  # torch's cache emptied before each resume; a clear error if it cannot fit
            "rollout=sglang",
            "Lower rollout.mem_fraction (SGLang's share of the GPU), or the trainer's peak: "
            "train.max_tokens_per_microbatch (packing) or a smaller train.micro_batch_size, "
            "train.offload_optimizer_during_rollout=true.",
        )
        self._weights_synced = False
        self._pushes = 0
        self._flattened = self.settings.flattened_bucket  # off for good if this SGLang refuses the load format
        self.last_push_metrics: dict[str, float] = {}  # the step log's push/ metrics (the trainer reads them)
        m = cfg.model
        self._routing = (m.num_layers, m.moe_router_topk) if cfg.rollout.routing_replay and m.is_moe else None
        base_gpu = self._check_gpu_layout()
        if self.is_owner:
            self._start(base_gpu)
        self._release(list(ALL_TAGS))  # give the GPU back until the first generate

    # ------------------------------------------------------------------------------ startup
    def _check_gpu_layout(self) -> int:
        """The owner's GPU index; with TP > 1 the group's GPUs must be consecutive on one node."""
        if not torch.cuda.is_available():
            return 0  # CPU: only the fake sglang of the tests gets here
        gpu = torch.cuda.current_device()
        if self._tp_size == 1:
            return gpu
        where: list = [None] * self._tp_size
        dist.all_gather_object(where, (socket.gethostname(), gpu), group=self._tp_group)
        host0, gpu0 = where[0]
        if any(h != host0 or g != gpu0 + i for i, (h, g) in enumerate(where)):
            raise ValueError(
                f"rollout=sglang: the TP group must own consecutive GPUs of one node, got {where}; "
                "SGLang's tp_size workers are placed on GPUs base..base+tp-1"
            )
        return gpu0

    def _start(self, base_gpu: int) -> None:
        import_sglang()  # a clear error before the HF config is written
        hf = hf_config_from_model_config(
            self.cfg.model,
            self.weights.vocab_size,
            dtype="bfloat16" if self.dtype == torch.bfloat16 else "float32",
            eos_token_id=int(self.tokenizer.eos_id),
        )
        self._model_dir = Path(tempfile.mkdtemp(prefix="r1mega_sglang_"))
        (self._model_dir / "config.json").write_text(json.dumps(hf, indent=1))
        kwargs: dict[str, Any] = dict(
            model_path=str(self._model_dir),
            load_format="dummy",  # weights come from the trainer (update_weights_from_tensor) before any use
            dtype=hf["torch_dtype"],
            skip_tokenizer_init=True,
            attention_backend=self.settings.attention_backend,
            sampling_backend=self.settings.sampling_backend,
            mem_fraction_static=self.settings.mem_fraction,
            enable_memory_saver=True,
            disable_cuda_graph=self.settings.disable_cuda_graph,
            disable_prefill_cuda_graph=self.settings.disable_prefill_cuda_graph,
            tp_size=self._tp_size,
            base_gpu_id=base_gpu,
            port=self.settings.base_port + 100 * base_gpu,
            random_seed=self.cfg.train.seed + self._dp_rank,
            max_running_requests=self.settings.max_batch_size,
            log_level="error",
        )
        if self.settings.cuda_graph_max_bs is not None:  # sglang 0.5.17's name (--cuda-graph-max-bs is its alias)
            kwargs["cuda_graph_max_bs_decode"] = self.settings.cuda_graph_max_bs
        if self.settings.cuda_graph_bs is not None:  # an explicit list: its largest size is SGLang's max_bs
            kwargs["cuda_graph_bs_decode"] = sorted({int(b) for b in self.settings.cuda_graph_bs})
        if self.settings.chunked_prefill_size is not None:
            kwargs["chunked_prefill_size"] = self.settings.chunked_prefill_size
        if self._routing is not None:
            kwargs["enable_return_routed_experts"] = True
        if self.settings.deterministic:
            kwargs["enable_deterministic_inference"] = True
        if self.cfg.train.fp32_lm_head:  # server_args.py of sglang 0.5.17: logits in fp32 (logits_processor.py)
            kwargs["enable_fp32_lm_head"] = True
        kwargs.update(self.engine_kwargs)
        self.engine_args = kwargs  # what the server was started with (tools/compare_trainer_engine.py reuses them)
        self._engine = start_engine(**kwargs)

    # ------------------------------------------------------------------------------ memory
    def _release(self, tags: list[str]) -> None:
        tags = [t for t in tags if t not in self._released]
        if not tags:
            return
        if self._engine is not None:
            self._handover.release(lambda: self._engine.release_memory_occupation(tags=tags))
        self._released.update(tags)
        if WEIGHTS in tags:
            self._weights_synced = False  # the memory saver does not keep the contents

    def _resume(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self._released]
        if not tags:
            return
        if self._engine is not None:
            rest = self._released.issubset(tags)
            self._handover.resume(lambda: self._engine.resume_memory_occupation(tags=tags), rest=rest)
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()  # this rank's GPU hosts one of the owner's TP schedulers
        self._released.difference_update(tags)

    def release_memory(self) -> None:
        self._release(list(ALL_TAGS))

    def resume_memory(self) -> None:
        self._resume(list(ALL_TAGS))

    # ------------------------------------------------------------------------------ weights
    def update_weights(self, source: WeightSource) -> None:
        """Push the trainer's weights (collective over the TP / EP groups: every rank must call it).

        Single-dtype flattened buckets (r1mega/rollout/weight_push.py) over CUDA IPC; after the first push and
        every ``rollout.verify_push_every``-th (if set), a sample is read back; ``last_push_metrics`` has the split."""
        self._resume([WEIGHTS])  # the weights must be resident to be written; the KV cache can wait
        stats, sample = PushStats(), {}
        every = self.settings.verify_push_every
        verify = self._engine is not None and (self._pushes == 0 or (every and self._pushes % every == 0))
        groups = source.hf_buckets(1, self.dtype)  # a 1-byte bucket size yields the export's groups one by one
        for bucket in timed(stats, "gather", plan_buckets(groups, self.bucket_bytes)):
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if verify and len(sample) < VERIFY_SAMPLES:  # a device-to-host copy (a sync): only when it is read
                name, t = bucket[0]
                sample[name] = t[:VERIFY_ROWS].detach().float().cpu()
            if self._engine is not None:
                self._send(bucket, stats)
            del bucket
        if self._engine is not None:
            self._engine.flush_cache()  # no prefix computed with the old weights may be reused
        stats.seconds = time.perf_counter() - stats.started
        if verify:
            t0 = time.perf_counter()
            self._verify(sample)
            stats.verify = time.perf_counter() - t0
        self._pushes += 1
        self.last_push_metrics = stats.metrics()
        self._weights_synced = True

    def _send(self, bucket, stats: PushStats) -> None:
        if self._flattened:
            t0 = time.perf_counter()
            payloads, flat = flattened_payloads(bucket, self._tp_size)
            t1 = time.perf_counter()
            try:
                _check_loaded(
                    self._engine.update_weights_from_tensor(
                        named_tensors=payloads, load_format="flattened_bucket", flush_cache=False
                    )
                )
            except Exception as e:  # noqa: BLE001 - keep the run alive on the plain path, and say so
                if self._pushes > 0 or stats.buckets > 1:
                    raise  # it worked before: a real failure, not an unsupported load format
                log.warning(
                    "rollout=sglang: flattened_bucket push failed (%s: %s); pushing tensor lists", type(e).__name__, e
                )
                self._flattened = False
            else:
                stats.times["convert"] += t1 - t0
                stats.times["ipc_load"] += time.perf_counter() - t1
                del flat  # SGLang has loaded it (the call returns after the schedulers did): the buffer may go
                return
        t0 = time.perf_counter()
        _check_loaded(self._engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False))
        stats.times["ipc_load"] += time.perf_counter() - t0

    def _verify(self, sample: dict[str, torch.Tensor]) -> None:
        """Read back the first rows of sampled pushed tensors; SGLang drops unknown names silently."""
        if self.arch not in READABLE:
            log.warning("rollout=sglang: push not verified, SGLang 0.5.17 has no get_weights_by_name for %s", self.arch)
            return
        for name, want in sample.items():
            got = self._engine.get_weights_by_name(name, truncate_size=VERIFY_ROWS)
            if got is None:
                raise RuntimeError(
                    f"rollout=sglang: the pushed tensor {name} did not land (SGLang has no parameter it maps to); "
                    "check the HF name mapping of this architecture (r1mega/model/hf_export.py)"
                )
            got = torch.as_tensor(got, dtype=torch.float32)
            if got.numel() != want.numel():  # a fused SGLang parameter read back in another layout: cannot compare
                log.warning("rollout=sglang: %s read back as %s, pushed %s: not compared", name, tuple(got.shape),
                            tuple(want.shape))  # fmt: skip
                continue
            got = got.reshape(want.shape)
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-3):
                err = (got - want).abs().max().item()
                raise RuntimeError(
                    f"rollout=sglang: {name} in SGLang differs from the pushed tensor (max |diff| {err:.3g})"
                )

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if not self._weights_synced:
            self.update_weights(self.weights)
        self.resume_memory()
        out: Optional[list[Rollout]] = None
        if self._engine is not None and prompts:
            eos = int(self.tokenizer.eos_id)
            seeds = [
                None if params.seed is None else request_seed(params.seed, self._dp_rank, i)
                for i in range(len(prompts))
            ]
            extra = {"return_routed_experts": True} if self._routing is not None else {}
            results = self._engine.generate(
                input_ids=[list(map(int, p)) for p in prompts],
                sampling_params=[sampling_dict(params, eos, s) for s in seeds],
                return_logprob=params.logprobs,
                **extra,
            )
            if len(results) != len(prompts):
                raise RuntimeError(f"SGLang returned {len(results)} outputs for {len(prompts)} prompts")
            out = [to_rollout(p, r, eos, self._routing) for p, r in zip(prompts, results)]
        elif self.is_owner:
            out = []
        return self._share(out)

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Teacher-forced log p(t_k | t_<k) for k >= ``starts[i]`` of each sequence, through SGLang's prefill
        (extend) kernels instead of the decode path that produced a rollout's log-probs: what the decode path adds
        to the engine/trainer gap (tools/compare_trainer_engine.py). Collective over the TP group, as generate."""
        if not self._weights_synced:
            self.update_weights(self.weights)
        self.resume_memory()
        out: Optional[list[list[float]]] = None
        if self._engine is not None and sequences:
            # SGLang returns the tokens from logprob_start_len on, the first one's value None (no logits before it),
            # and keeps no cached prefix past logprob_start_len: everything scored is recomputed here
            results = self._engine.generate(
                input_ids=[list(map(int, q)) for q in sequences],
                sampling_params=[{"temperature": 0.0, "max_new_tokens": 1} for _ in sequences],
                return_logprob=True,
                logprob_start_len=[max(k - 1, 0) for k in starts],
            )
            out = [scored_logprobs(r, q[k:]) for q, k, r in zip(sequences, starts, results)]
        elif self.is_owner:
            out = []
        return self._share(out)

    def _share(self, out: Any) -> Any:
        """The owner's result on every rank of the TP group (only the owner drives SGLang)."""
        if self._tp_size > 1:
            box = [out]
            dist.broadcast_object_list(box, src=self._owner_rank, group=self._tp_group)
            out = box[0]
        return out

    def shutdown(self) -> None:
        if self._engine is not None:  # confined to SGLang's own processes (sglang_server.py says why)
            shutdown_engine(self._engine)
            self._engine = None
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None
