"""The numeric settings of a run, each checked before anything is loaded or submitted (no model
library: the sweep checks every job's before it submits one)."""

from __future__ import annotations

from omegaconf import DictConfig

from .errors import ConfigError
from .protocol import check as check_protocol


def _number(value, name: str, low: float, high: float | None = None, *, integer: bool = False,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Refuse a setting outside [low, high] (``*_open``: the bound excluded) in one sentence."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {'∞)' if high is None else f'{high:g}' + (')' if high_open else ']')}"
        raise ConfigError(f"{name} must be {kind} in {bounds}, got {value!r}.")


def check_settings(cfg: DictConfig, method=None) -> None:
    """Refuse, one sentence each, a training, data, task or protocol setting that cannot run (a
    negative learning rate, no epochs, an empty batch, an official setting not built yet ...), before
    anything trains. ``method`` (``flare_exp.methods.method_for(cfg.method)``): an official setting
    not built yet that cannot change its run is let through."""
    for group in ("stage1", "train"):
        settings = cfg[group]
        _number(settings.lr, f"{group}.lr", 0, low_open=True)
        _number(settings.batch_size, f"{group}.batch_size", 1, integer=True)
        _number(settings.grad_accum, f"{group}.grad_accum", 1, integer=True)
        _number(settings.epochs, f"{group}.epochs", 1, integer=True)
        _number(settings.get("max_steps"), f"{group}.max_steps", 1, integer=True, optional=True)
        _number(settings.warmup_ratio, f"{group}.warmup_ratio", 0, 1)
        _number(settings.weight_decay, f"{group}.weight_decay", 0)
        _number(settings.r, f"{group}.r", 1, integer=True)
        _number(settings.alpha, f"{group}.alpha", 0, low_open=True)
        _number(settings.dropout, f"{group}.dropout", 0, 1, high_open=True)
        _number(settings.checkpoint_every, f"{group}.checkpoint_every", 0, integer=True)
        _number(settings.get("eval_every"), f"{group}.eval_every", 0, integer=True, optional=True)
    if cfg.stage1.get("select", "best") not in ("best", "last"):
        raise ConfigError(f"stage1.select must be best or last, got {cfg.stage1.select!r}.")
    train = cfg.train
    _number(train.eval_batch_size, "train.eval_batch_size", 1, integer=True)
    task = cfg.task
    _number(task.max_length, "task.max_length", 8, integer=True)
    _number(task.max_new_tokens, "task.max_new_tokens", 1, integer=True)
    if task.type == "qa" and task.get("stride") is not None:
        _number(task.stride, "task.stride", 0, task.max_length, integer=True, high_open=True)
    for cap in ("max_train", "max_validation", "max_test"):
        _number(cfg.data.get(cap), f"data.{cap}", 1, integer=True, optional=True)
    check_protocol(cfg.protocol, cfg.task, cfg.model, method)
