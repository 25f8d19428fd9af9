"""The plug-in points: objectives (losses), advantage estimators and rollout engines, by name.

Each table maps a config value to an import path ``"module:attr"``; nothing is imported until it is
asked for (the SGLang engine needs a GPU install, the kernels need Triton). A config value that is not
a registered name but contains ``:`` is imported as it stands, so a user's own loss is one module and
one override, as verl's ``register_policy_loss`` / slime's ``--custom-loss-function-path`` allow::

    r1mega-train algo.loss=my_pkg.losses:MyObjective       # a class with the Objective protocol
    r1mega-train algo.advantage=my_pkg.adv:leave_one_out    # (rewards, algo_cfg) -> advantages
    r1mega-train rollout.backend=my_pkg.engine:MyEngine     # a class with the RolloutEngine protocol

or, from Python, ``LOSSES.register("my_loss", "my_pkg.losses:MyObjective")`` and ``algo.loss=my_loss``.
The protocols are :class:`r1mega.objectives.base.Objective`, :data:`r1mega.grpo.advantages.AdvantageFn`
and :class:`r1mega.rollout.base.RolloutEngine`.
"""

from __future__ import annotations

import importlib
from typing import Any

from r1mega.config_checks import ConfigError


class Registry:
    """``name -> "module:attr"``, imported lazily; unknown names that look like import paths are imported."""

    def __init__(self, kind: str, config_key: str, entries: dict[str, str]) -> None:
        self.kind, self.config_key = kind, config_key
        self._entries: dict[str, str | Any] = dict(entries)

    def register(self, name: str, target: str | Any) -> None:
        """Add ``name``: an import path ``"module:attr"`` or the object itself."""
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolves(self, value: str) -> bool:
        """Whether ``value`` can name an entry (a registered name, or an import path), without importing."""
        return value in self._entries or ":" in value

    def get(self, value: str) -> Any:
        target = self._entries.get(value, value)
        if not isinstance(target, str):
            return target
        module, sep, attr = target.partition(":")
        if not sep:
            raise ConfigError(
                f"{self.config_key}={value!r} is not a registered {self.kind} ({', '.join(self.names())}) "
                "nor an import path 'module:attr'"
            )
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{self.config_key}={value!r}: cannot import {target!r}: {e}") from e
        return obj


LOSSES = Registry(
    "objective",
    "algo.loss",
    {"grpo": "r1mega.objectives.grpo:GRPOObjective", "sft": "r1mega.objectives.sft:SFTObjective"},
)
ADVANTAGES = Registry("advantage estimator", "algo.advantage", {"grpo": "r1mega.grpo.advantages:grpo_advantages"})
ROLLOUT_ENGINES = Registry(
    "rollout engine",
    "rollout.backend",
    {
        "megatron": "r1mega.rollout.megatron_engine:MegatronRolloutEngine",
        "sglang": "r1mega.rollout.sglang_engine:SGLangRolloutEngine",
    },
)
