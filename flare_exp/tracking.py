"""The W&B mirror of a run (``tracking.mode``: online | offline | disabled)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@contextmanager
def tracker(cfg: DictConfig, method, directory: Path, enabled: bool = True):
    """A W&B run mirroring the run of ``cfg`` (its ``method``), always closed, even on failure."""
    if cfg.tracking.mode == "disabled" or not enabled:
        yield None
        return
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity, mode=cfg.tracking.mode,
        dir=str(directory), group=cfg.experiment_name or f"{cfg.task.name}-{cfg.model.name}",
        name=f"{method.label}-{cfg.lang.code}-seed{cfg.seed}",
        tags=[method.name, cfg.lang.code, f"seed{cfg.seed}", cfg.task.name, cfg.model.name],
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        yield run
    finally:
        run.finish()
