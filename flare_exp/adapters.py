"""What stage 2 trains, built on the stage-1 model: one builder per kind of adapter a method
declares (``Method.adapter``), and the LoRA adapter of stage 1."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model

from .flare import FlareConfig, get_flare_model
from .flare.model import keeps_stage1_adapter
from .flare.mt import FlareMTModel
from .train import copy_into, trainable_weights
from .xmixup import XMixupModel

STAGE2_ADAPTER = "stage2"


def lora_config(model_cfg: DictConfig, settings: DictConfig, modules_to_save=None) -> LoraConfig:
    """The LoRA adapter of stage 1 (``settings``: ``cfg.stage1``) and of the LoRA-based stage-2
    methods (``cfg.train``)."""
    targets = model_cfg.lora_targets
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      modules_to_save=modules_to_save)


def task_head(model_cfg: DictConfig, task_cfg: DictConfig) -> list[str] | None:
    """The encoder's task head (``classifier``, or ``qa_outputs`` for QA), trained in full in
    stage 1; None for generative models."""
    if model_cfg.kind != "encoder":
        return None
    return ["qa_outputs"] if task_cfg.type == "qa" else ["classifier"]


def stage2_head(model_cfg: DictConfig, task_cfg: DictConfig) -> list[str] | None:
    """The task head where the model config says ``train_head`` (the official code: yes): trained
    in the stage 2 of every method alike."""
    return task_head(model_cfg, task_cfg) if model_cfg.get("train_head", False) else None


def flare_config(method_cfg: DictConfig, model_cfg: DictConfig, train_cfg: DictConfig, head=None,
                 **options) -> FlareConfig:
    """FLARE's adapter (unknown fusion, alignment, r, ... raise ValueError here); ``options``: the
    protocol's FLARE settings (``Setup.flare_options``: source_train_mode, checkpointed_fusion,
    official_fusion_layer)."""
    targets = model_cfg.lora_targets
    return FlareConfig(
        r=train_cfg.r, alpha=train_cfg.alpha, dropout=train_cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fuse_modules=model_cfg.fuse_modules, fusion=method_cfg.fusion, heads=method_cfg.heads,
        alignment=method_cfg.alignment, mask_source_padding=method_cfg.mask_source_padding,
        modules_to_save=head, **options,
    )


def check(method, model_cfg: DictConfig, train_cfg: DictConfig) -> None:
    """Refuse an adapter that cannot be built (ValueError, one sentence), before any model loads."""
    method.check()
    if method.adapter in ("flare", "flare_mt"):
        flare_config(method.cfg, model_cfg, train_cfg)


def _lora(stage1: PeftModel, adapter: LoraConfig, seed: int):
    torch.manual_seed(seed)
    if keeps_stage1_adapter(stage1):
        # Merging would re-quantise 4-bit weights: stage 1 stays as a frozen adapter.
        stage1.add_adapter(STAGE2_ADAPTER, adapter)
        stage1.base_model.set_adapter([STAGE2_ADAPTER, stage1.active_adapter])
        for name, param in stage1.named_parameters():
            param.requires_grad_(f".{STAGE2_ADAPTER}." in name)
        return stage1
    return get_peft_model(stage1.merge_and_unload(), adapter, adapter_name=STAGE2_ADAPTER)


def _hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.d_model


def build(method, stage1: PeftModel, model_cfg: DictConfig, train_cfg: DictConfig, seed: int, head=None,
          mt_encoder=None, flare_options: dict | None = None):
    """The model to train and test: ``stage1`` itself where the method trains nothing, else the
    method's adapter on it (``head``: the task head trained too; ``mt_encoder``: FLARE MT's
    ``MTEncoder``; ``flare_options``: the protocol's FLARE settings, ``flare_config``)."""
    kind = method.adapter
    if kind is None:
        return stage1
    if kind in ("lora", "xmixup"):
        model = _lora(stage1, lora_config(model_cfg, train_cfg, head), seed)
        if kind == "lora":
            return model
        cfg = method.cfg
        return XMixupModel(model, STAGE2_ADAPTER, layers=cfg.layers, lambda0=cfg.lambda0, heads=cfg.heads)
    torch.manual_seed(seed)
    flare = get_flare_model(stage1, flare_config(method.cfg, model_cfg, train_cfg, head, **(flare_options or {})))
    if kind == "flare":
        return flare
    if kind == "flare_mt":
        return FlareMTModel(flare, mt_encoder.model, mt_encoder.width, _hidden_size(flare.hf_model))
    raise ValueError(f"Method {method.name} declares an adapter {kind!r} that flare_exp.adapters cannot build.")


def save(model, path: Path) -> None:
    """The trained stage 2 (every trainable parameter, the selected step's) as safetensors, so
    that it can be evaluated again without retraining."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.writing")
    save_file(trainable_weights(model), str(staging))
    staging.replace(path)


def load(model, path: Path) -> None:
    """Put a run's saved stage 2 into ``model`` (the same method built on the same stage 1)."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(f"{path} does not hold this method's trainable parameters.")
    copy_into(model, weights)
