"""Process groups: from torchrun or Slurm environment variables to megatron's parallel state.

One entry point, :func:`init_runtime`, used by the trainer, the tools and the tests. It picks the
device (CUDA when present, else the CPU with :mod:`r1mega.parallel.cpu_compat`), the backend (NCCL on
GPUs, gloo on the CPU), and builds megatron's TP / PP / EP / CP / DP groups from the config.

**Where megatron may be imported** (the rule behind the function-local ``from megatron...`` imports; it
lives here because this module is the line between the light paths and the megatron world):

- Modules on the training path, which only load once a run is being built, import megatron at their top:
  ``engine``, ``objectives.*``, ``trainer``, ``sft``, ``grpo.logprobs``, ``rollout.megatron_engine`` /
  ``sglang_engine``. They may load before :func:`init_runtime` (``train.run`` resolves the plug-ins first);
  that is safe because :mod:`~r1mega.parallel.cpu_compat` patches megatron's module attributes, which
  megatron looks up at call time, after importing those modules itself.
- Everything a light path loads keeps megatron out of its import: ``config`` / ``config_checks`` /
  ``registry``, ``data``, ``rewards``, ``tracking``, ``train``'s module level and this module (its functions
  import megatron inside). Light paths: ``r1mega-train --cfg job`` and config errors (which must answer in
  about a second, not after the ~10 s ``import megatron.core`` with torch._dynamo / inductor), each spawned
  reward worker (a fresh interpreter importing ``r1mega.rewards``), and the entry point's own start, which
  must set its warning filters, ``OMP_NUM_THREADS`` and log levels (``train._quiet``) before megatron's
  import-time warnings.
- The one ordering hazard against the CPU layer: never bind a name that ``cpu_compat.install()`` replaces
  (``from torch.cuda import current_device``, ``from megatron.core.transformer.moe.moe_utils import
  maybe_move_tensor_to_cpu``) at module level: the binding would keep the CUDA original. Import the module
  (``from megatron.core import parallel_state``) and look the name up when it is called.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1mega.config import ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:  # scontrol expands compressed node lists ("node[01-04]") exactly as Slurm does
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        first = out.stdout.split()
        if first:
            return first[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _first_host(nodelist)


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: "gpu[07-08,11],cpu01" -> "gpu07"."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env_from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank / world size / rendezvous from torchrun's variables, else Slurm's, else a single process.

    torchrun wins when both are set (``srun torchrun ...`` sets both; torchrun's are the truth).
    Under ``srun`` without torchrun each task is one rank: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS,
    MASTER_ADDR = first host of the job, MASTER_PORT derived from the job id (stable across tasks).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 40000),
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=_free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Runtime:
    env: DistEnv
    device: torch.device
    parallel: ParallelConfig

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_runtime(parallel: ParallelConfig, seed: int, device: str = "auto", threads: int = 0) -> Runtime:
    """Initialise torch.distributed and megatron's model-parallel groups for this process."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    env = dist_env_from_environ()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        from r1mega.parallel import cpu_compat

        cpu_compat.install()
        dev = torch.device("cpu")
    if threads > 0:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        backend = parallel.backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or 1,
    )
    # Without CUDA there are no CUDA RNG states to fork; inference_rng_tracker makes the tracker's
    # fork() a no-op (dropout then draws from the CPU generator, which torch.manual_seed sets).
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not use_cuda, force_reset_rng=True)
    torch.manual_seed(seed)
    return Runtime(env=env, device=dev, parallel=parallel)


def shutdown_runtime() -> None:
    """Tear down megatron and torch.distributed state (tests run several layouts in one process)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    parallel_state.destroy_model_parallel()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    clear_aux_losses_tracker()
    if dist.is_initialized():
        dist.destroy_process_group()
