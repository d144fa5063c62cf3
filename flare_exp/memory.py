"""Each job's peak GPU memory, estimated before it is submitted, and the remedy that makes it fit
the GPU the launcher declares (``cluster.gpu_memory_gb``) while keeping its effective batch.

The estimate is calibrated on the GPU check's rows of ``docs/throughput.csv`` (a row per model,
method and gradient checkpointing, at batch 32 x 128 tokens: measured on an H100 for Llama 3.1 8B
NF4 and XLM-R large, the other models' rows scaled from them by parameters): the weights (the
model's parameters at its dtype, 4 bits under NF4) stay, the rest of the row's peak grows with
the tokens of a micro-batch, and eager attention's scores (heads x length^2 per example and layer,
bf16, a single layer under gradient checkpointing) with the square of the length.

    peak(B, L) = W + (P_row - W - S(32, 128)) * (B * L) / (32 * 128) + S(B, L)

Remedies, in order: gradient checkpointing; then micro-batches of half the size with twice the
gradient accumulation, until it fits (or a micro-batch of one does not: the job is refused).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError
from .methods import method_class, method_for
from .protocol import checkpointing, input_length
from .settings import check_settings

THROUGHPUT = Path(__file__).resolve().parent.parent / "docs" / "throughput.csv"

# The published configs of the paper's models: parameters, layers, attention heads.
ARCHITECTURES = {
    "llama3.1-8b": (8.03e9, 32, 32),
    "gemma2-9b": (9.24e9, 42, 16),
    "qwen2.5-7b": (7.62e9, 28, 28),
    "mt5-xl": (3.74e9, 24, 32),
    "xlmr-large": (0.56e9, 24, 16),
}
# Their vocabularies, hidden widths and whether the LM head is tied to the input embeddings.
EMBEDDINGS = {"llama3.1-8b": (128256, 4096, False), "gemma2-9b": (256000, 3584, True), "qwen2.5-7b": (152064, 3584, False)}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.95  # of the GPU's memory a job may plan to use (allocator fragmentation, CUDA context)


@dataclass
class Fit:
    """A job class's estimated peak (GB) as configured and after its remedy, the remedy (the
    overrides it needs; empty where none), and whether it fits."""

    peak_gb: float
    remedied_gb: float
    remedy: dict
    fits: bool


def _scores_gb(model_cfg: DictConfig, batch: int, length: int, checkpointing: bool) -> float:
    """Eager attention's stored probabilities (bf16) of a micro-batch."""
    if model_cfg.get("attn_implementation") != "eager" or model_cfg.name not in ARCHITECTURES:
        return 0.0
    _, layers, heads = ARCHITECTURES[model_cfg.name]
    return batch * heads * length ** 2 * 2 * (1 if checkpointing else layers) / 1e9


def weights_gb(model_cfg: DictConfig) -> float:
    params = ARCHITECTURES[model_cfg.name][0]
    return params * (0.5 if model_cfg.quantization == "nf4" else BYTES.get(model_cfg.dtype, 4)) / 1e9


def peak_gb(model_cfg: DictConfig, row: dict, batch: int, length: int, checkpointing: bool,
            scale: float = 1.0) -> float:
    """The peak of a training step of ``batch`` x ``length`` from the throughput ``row`` (of the
    same model, method and checkpointing); ``scale``: of what grows with the tokens
    (``activation_scale``)."""
    weights = weights_gb(model_cfg)
    base_batch, base_length = int(row["batch"]), int(row["length"])
    rest = float(row["peak_gb"]) - weights - _scores_gb(model_cfg, base_batch, base_length, checkpointing)
    return weights + scale * (max(rest, 0.0) * batch * length / (base_batch * base_length)
                              + _scores_gb(model_cfg, batch, length, checkpointing))


def _param_bytes(cfg: DictConfig) -> int:
    """Bytes a parameter of a decoder's embeddings and LM head: the model's dtype, or under NF4
    ``protocol.unquantised_dtype`` (the official code's fp32)."""
    unquantised = cfg.protocol.unquantised_dtype if cfg.model.quantization == "nf4" else None
    return BYTES.get(unquantised or cfg.model.dtype, 4)


def trained_base_gb(cfg: DictConfig, settings: DictConfig) -> float:
    """What training the base model's own LM head and embeddings adds (``protocol.decoder_lm_head``,
    ``protocol.llama_pad_token``: the official code's): their gradients and optimizer states."""
    grad = _param_bytes(cfg)
    state = 2 if settings.get("optimizer") == "adamw_8bit" else 2 * grad
    return _trained_base_parameters(cfg) * (grad + state) / 1e9


def _trained_base_parameters(cfg: DictConfig) -> int:
    """Parameters of the base model's own that train (a decoder's LM head, a Llama's resized
    embeddings under the official protocol)."""
    from .protocol import family

    if cfg.model.kind != "decoder" or cfg.model.name not in EMBEDDINGS:
        return 0
    vocab, width, tied = EMBEDDINGS[cfg.model.name]
    matrices = int(cfg.protocol.decoder_lm_head == "trained")
    matrices += int(cfg.protocol.llama_pad_token == "new_token" and family(cfg.model) == "llama" and not tied)
    return matrices * vocab * width


def checkpoint_gb(cfg: DictConfig) -> float:
    """Disk a trained job's checkpoint takes for the base model's trained parameters (stage 1's
    ``base_weights.safetensors``, stage 2's ``adapter.safetensors``), saved in the dtype they
    train in; the LoRA weights beside them (megabytes) are left out."""
    return _trained_base_parameters(cfg) * _param_bytes(cfg) / 1e9


def unquantised_gb(cfg: DictConfig) -> float:
    """What a 4-bit decoder's embeddings and LM head add in ``protocol.unquantised_dtype`` over the
    model's dtype (the measured rows' bf16)."""
    if cfg.model.kind != "decoder" or cfg.model.name not in EMBEDDINGS:
        return 0.0
    vocab, width, tied = EMBEDDINGS[cfg.model.name]
    return (1 if tied else 2) * vocab * width * (_param_bytes(cfg) - BYTES.get(cfg.model.dtype, 4)) / 1e9


def activation_scale(cfg: DictConfig) -> float:
    """How much larger a 4-bit decoder's activations are in ``protocol.unquantised_dtype`` (its
    residual stream follows the norms' dtype) than in the model's dtype."""
    if cfg.model.kind != "decoder" or cfg.model.quantization != "nf4":
        return 1.0
    return _param_bytes(cfg) / BYTES.get(cfg.model.dtype, 4)


def fit(model_cfg: DictConfig, settings: DictConfig, length: int, rows: dict, gpu_gb: float,
        group: str, extra_gb: float = 0.0, scale: float = 1.0) -> Fit | None:
    """The fit of a training job on ``model_cfg`` with ``settings`` (``cfg.train`` or
    ``cfg.stage1``, named ``group`` in the remedy's overrides) at ``length`` tokens; ``rows``:
    checkpointing (bool) -> the throughput row of the model and method; ``extra_gb``: added to
    every peak (``trained_base_gb``, ``unquantised_gb``); ``scale``: ``peak_gb``'s. None where the model has no row or no published
    architecture here."""
    if model_cfg.name not in ARCHITECTURES or not rows:
        return None
    limit = HEADROOM * gpu_gb
    checkpointing, batch, accum = bool(settings.gradient_checkpointing), int(settings.batch_size), int(settings.grad_accum)
    if checkpointing not in rows:
        return None
    first = extra_gb + peak_gb(model_cfg, rows[checkpointing], batch, length, checkpointing, scale)
    peak, remedy = first, {}
    if peak > limit and not checkpointing and True in rows:
        checkpointing, remedy = True, {f"{group}.gradient_checkpointing": True}
        peak = extra_gb + peak_gb(model_cfg, rows[True], batch, length, True, scale)
    while peak > limit and batch > 1 and batch % 2 == 0:
        batch, accum = batch // 2, accum * 2
        remedy.update({f"{group}.batch_size": batch, f"{group}.grad_accum": accum})
        peak = extra_gb + peak_gb(model_cfg, rows[checkpointing], batch, length, checkpointing, scale)
    return Fit(first, peak, remedy, peak <= limit)


@lru_cache(maxsize=4)
def throughput_table(path: Path = THROUGHPUT) -> dict:
    """(model, method row, gradient checkpointing) -> the row of ``docs/throughput.csv``."""
    return {(r["model"], r["method"], r["gradient_checkpointing"] == "True"): r for r in csv.DictReader(path.open())}


def training_settings(cfg: DictConfig, group: str) -> DictConfig:
    """``cfg.stage1`` or ``cfg.train`` with the gradient checkpointing the stage runs under
    (``protocol.kbit_gradient_checkpointing`` switches it on for 4-bit weights, as ``Setup.settings``)."""
    settings = cfg[group]
    if checkpointing(cfg.protocol, cfg.model, settings) and not settings.gradient_checkpointing:
        settings = OmegaConf.merge(settings, {"gradient_checkpointing": True})
    return settings


def job_fits(cfg: DictConfig, table: dict | None = None) -> dict:
    """{(stage, task, model, method label, tokens): Fit} of one job's training stages (stage 1 as
    LoRA) against ``cluster.gpu_memory_gb``; a stage without an estimate is left out."""
    table = throughput_table() if table is None else table
    method, gpu = method_for(cfg.method), float(cfg.cluster.gpu_memory_gb)
    fits = {}
    for stage, cls, group, factor in (("stage1", method_class("lora"), "stage1", 1),
                                      ("stage2", method, "train", method.length_factor)):
        if stage == "stage2" and not method.trains:
            continue
        rows = {gc: row for (model, name, gc), row in table.items() if model == cfg.model.name and name == cls.cost_row}
        length = input_length(cfg.protocol, cfg.task) * factor
        found = fit(cfg.model, training_settings(cfg, group), length, rows, gpu, group,
                    trained_base_gb(cfg, cfg[group]) + unquantised_gb(cfg), activation_scale(cfg))
        if found is not None:
            fits[(stage, cfg.task.name, cfg.model.name, "lora" if stage == "stage1" else method.label, length)] = found
    return fits


def fitted(cfg: DictConfig, table: dict | None = None) -> DictConfig:
    """``cfg`` with the remedy of each of its training stages applied (the same config where it
    fits as it is); a job no remedy fits is refused (ConfigError, one sentence)."""
    check_settings(cfg, method_for(cfg.method))  # the batch sizes and lengths it reads
    fits = job_fits(cfg, table)
    _refuse_what_cannot_fit(fits, cfg)
    remedy = {key: value for f in fits.values() for key, value in f.remedy.items()}
    if remedy:
        cfg = cfg.copy()
        with open_dict(cfg):
            for key, value in remedy.items():
                group, name = key.split(".")
                cfg[group][name] = value
    return cfg


def _refuse_what_cannot_fit(fits: dict, cfg: DictConfig) -> None:
    for (stage, task, model, label, length), f in sorted(fits.items()):
        if not f.fits:
            raise ConfigError(f"The {stage} of {task} {model} {label} ({length} tokens) needs about "
                              f"{f.remedied_gb:.0f} GB on a {cfg.cluster.gpu_memory_gb:g} GB GPU (cluster.gpu_memory_gb) "
                              "even with gradient checkpointing and micro-batches of one: it cannot run there.")
