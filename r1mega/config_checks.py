"""How configs are checked: the field-check helpers each dataclass of :mod:`r1mega.config` calls in its
``__post_init__``, the rules across sections and against the world size (:func:`validate`), and the
conversion of Hydra's composed config that refuses undeclared ``+`` keys (:func:`config_from_hydra`), and
the schema's registration with Hydra (:func:`register_configs`).

r1mega.config imports this module (and re-exports its public names); ``cfg`` is a :class:`r1mega.config.Config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, get_args


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


def _check(
    obj: Any, section: str, positive: str = "", nonneg: str = "", choices: Optional[dict[str, Any]] = None
) -> None:
    """Range checks of ``obj``'s fields (space-separated names; None, an unset Optional, passes) and choices
    (field -> its ``Literal`` type)."""
    pos = positive.split()
    for name in pos + nonneg.split():
        v = getattr(obj, name)
        if v is not None and (v < 0 or (v == 0 and name in pos)):
            raise ConfigError(f"{section}.{name}={v!r} must be {'> 0' if name in pos else '>= 0'}")
    for name, allowed in (choices or {}).items():
        options = get_args(allowed)
        if getattr(obj, name) not in options:
            raise ConfigError(
                f"{section}.{name}={getattr(obj, name)!r} is not one of {list(options)}; set {section}.{name} "
                "to one of them"
            )


def _in_range(obj: Any, section: str, name: str, interval: str) -> None:
    """``interval`` as written in maths: "(0, 1]" excludes 0 and includes 1."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    v = getattr(obj, name)
    if v < lo or v > hi or (interval[0] == "(" and v == lo) or (interval[-1] == ")" and v == hi):
        raise ConfigError(f"{section}.{name}={v!r} must be in {interval}")


def _plugin(section: str, name: str, value: str, registry_name: str) -> None:
    from r1mega import registry

    reg = getattr(registry, registry_name)
    if not reg.resolves(value):
        raise ConfigError(
            f"{section}.{name}={value!r} is not a registered {reg.kind} ({', '.join(reg.names())}) nor an "
            "import path 'module:attr'"
        )


def validate(cfg: Any, world_size: int = 1) -> None:
    """The rules across sections and against the world size (each section checked its own fields on
    construction; they are checked again here, for configs changed after it). Raises ConfigError."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).__post_init__()
    m, p, a, r = cfg.model, cfg.parallel, cfg.algo, cfg.rollout
    if m.is_moe:
        if m.num_experts % p.ep:
            raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}")
    elif p.ep > 1:
        raise ConfigError("parallel.ep > 1 needs an MoE model (model.num_experts > 0); set parallel.ep=1")
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} not divisible by parallel.pp={p.pp}")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp={model_parallel}; "
            "change the parallel sizes or the number of processes"
        )
    etp = p.etp or 1
    if (world_size // p.pp) % (p.ep * etp):
        raise ConfigError(
            f"parallel.ep*etp={p.ep * etp} must divide world_size/pp={world_size // p.pp}; change parallel.ep"
        )
    if r.prompts_per_step % a.num_minibatches:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by algo.num_minibatches="
            f"{a.num_minibatches}"
        )
    if cfg.data.template == "chat" and m.tokenizer == "char":
        raise ConfigError("data.template=chat needs a HF tokenizer with a chat template: set model.tokenizer=<path>")
    if cfg.train.max_tokens_per_microbatch and getattr(r, "routing_replay", False):
        raise ConfigError(
            "rollout.routing_replay=true with train.max_tokens_per_microbatch (packed microbatches): the replayed "
            "experts are not packed yet; set train.max_tokens_per_microbatch=0 or rollout.routing_replay=false"
        )
    if cfg.optim.cpu_offload and cfg.train.precision != "bf16" and p.distributed_optimizer:
        raise ConfigError(
            "optim.cpu_offload=true needs separate fp32 main params: train.precision=bf16, or "
            "parallel.distributed_optimizer=false (megatron's HybridDeviceOptimizer cannot step the fp32 shards)"
        )


def _unknown_keys(node: Any, path: str) -> list[str]:
    """Keys of typed nodes that their dataclass does not declare (Hydra's ``+key=value`` adds them)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return []
    typ = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    out = []
    for key in node.keys():
        name = f"{path}{key}"
        if known is not None and key not in known:
            out.append(f"{name} (known keys of {path.rstrip('.') or 'the config'}: {', '.join(sorted(known))})")
        else:
            out += _unknown_keys(node._get_node(key), f"{name}.")
    return out


def config_from_hydra(dcfg: Any) -> Any:
    """Hydra's composed DictConfig -> the typed Config, refusing keys no dataclass declares."""
    from omegaconf import OmegaConf

    unknown = _unknown_keys(dcfg, "")
    if unknown:
        raise ConfigError(f"unknown config key {'; '.join(unknown)}; check the spelling (remove the '+')")
    return OmegaConf.to_object(dcfg)


def register_configs() -> None:
    """Register the schema so conf/*.yaml are typed: conf/config.yaml extends `base_config`."""
    from hydra.core.config_store import ConfigStore

    from r1mega.config import (
        AlgoConfig,
        Config,
        MegatronRolloutConfig,
        ModelConfig,
        ParallelConfig,
        RolloutConfig,
        SGLangRolloutConfig,
    )

    cs = ConfigStore.instance()
    # the rollout node typed by the base class, so that each group (conf/rollout/<engine>.yaml) can set its subclass
    cs.store(name="base_config", node=Config(rollout=RolloutConfig()))
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="algo", name="base_algo", node=AlgoConfig)
    cs.store(group="rollout", name="base_megatron", node=MegatronRolloutConfig)
    cs.store(group="rollout", name="base_sglang", node=SGLangRolloutConfig)
