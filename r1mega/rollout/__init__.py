"""Rollout engines: the interface in :mod:`.base`, the backends registered in r1mega.registry.ROLLOUT_ENGINES."""

from __future__ import annotations

from r1mega.config import Config, ConfigError


def rollout_engine_class(cfg: Config) -> type:
    """The class ``rollout.backend`` names, checked against the settings group it needs (cheap: call early)."""
    from r1mega.registry import ROLLOUT_ENGINES

    cls = ROLLOUT_ENGINES.get(cfg.rollout.backend)
    want = getattr(cls, "settings_type", None)
    if want is not None and not isinstance(cfg.rollout, want):
        raise ConfigError(
            f"rollout.backend={cfg.rollout.backend!r} takes its settings from {want.__name__}, but the rollout "
            f"group holds {type(cfg.rollout).__name__}: select the engine's group (e.g. rollout={cfg.rollout.backend})"
        )
    return cls


def build_rollout_engine(cfg: Config, weights, tokenizer):
    """The engine of ``rollout.backend``, through its one constructor ``from_config(cfg, weights, tokenizer)``."""
    return rollout_engine_class(cfg).from_config(cfg, weights, tokenizer)
