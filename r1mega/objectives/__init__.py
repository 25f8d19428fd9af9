"""Training objectives: one file each (settings, PyTorch path, kernel path, metrics); see :mod:`.base`."""

from __future__ import annotations

from r1mega.config import Config


def build_objective(cfg: Config, device):
    """The objective named by ``algo.loss`` (a registered name or ``module:attr``), built from the config."""
    from r1mega.registry import LOSSES

    return LOSSES.get(cfg.algo.loss).from_config(cfg, device)
