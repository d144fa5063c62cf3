"""The methods of the paper's tables, one class each: the only reader of ``cfg.method``.

A method says what stage 2 trains (nothing, a LoRA adapter, FLARE, ...), whether the model reads
the English version of each example in its forward, what the test inputs are, how its stage-2
model is built from the stage-1 model, and its label (its name plus the settings that differ
from the defaults, which names its run directory). Adding a method: one class registered here
under its name, and one config file ``conf/method/<name>.yaml`` with ``name: <name>`` and its
settings.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model

from .data.collate import concatenate_inputs
from .flare import FlareConfig, get_flare_model
from .flare.model import keeps_stage1_adapter
from .flare.mt import FlareMTModel
from .xmixup import XMixupModel

STAGE2_ADAPTER = "stage2"
METHODS: dict[str, type["Method"]] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def method_for(method_cfg: DictConfig) -> "Method":
    """The method of a ``cfg.method`` config."""
    if method_cfg.name not in METHODS:
        raise ValueError(f"Unknown method {method_cfg.name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[method_cfg.name](method_cfg)


def lora_config(model_cfg: DictConfig, settings: DictConfig, modules_to_save=None) -> LoraConfig:
    """The LoRA adapter of stage 1 (``settings``: ``cfg.stage1``) and of the LoRA-based stage-2
    methods (``cfg.train``)."""
    targets = model_cfg.lora_targets
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      modules_to_save=modules_to_save)


def task_head(cfg: DictConfig) -> list[str] | None:
    """The encoder's task head (``classifier``, or ``qa_outputs`` for QA), trained in full in
    stage 1 and, where the model config says ``train_head`` (the official code: yes), in the
    stage 2 of every method alike; None for generative models."""
    if cfg.model.kind != "encoder":
        return None
    return ["qa_outputs"] if cfg.task.type == "qa" else ["classifier"]


def _stage2_head(cfg: DictConfig) -> list[str] | None:
    return task_head(cfg) if cfg.model.get("train_head", False) else None


def _hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.d_model


class Method:
    """Zero-shot: the stage-1 model on the target test set."""

    name = "zero_shot"
    trains = False                 # stage 2 trains an adapter
    english_in_forward = False     # the model reads the English version in its forward
    test_input = "target"          # target | english (translate-test) | fused (English + target)
    needs_mt_encoder = False       # FLARE MT's frozen MT encoder

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def reads_english_test(self) -> bool:
        """The method needs the English version of the test set (in its forward or as input)."""
        return self.english_in_forward or self.test_input in ("english", "fused")

    @property
    def length_factor(self) -> int:
        return 2 if self.test_input == "fused" else 1

    @property
    def label(self) -> str:
        return self.name

    def check(self, cfg: DictConfig) -> None:
        """Refuse settings that cannot run (ValueError, one sentence), before any model loads."""

    def build(self, cfg: DictConfig, stage1: PeftModel, mt_encoder=None):
        """The model to train and test, from the stage-1 model (``mt_encoder``: (encoder, width))."""
        return stage1

    def inputs(self, targets: list[dict], english: list[dict] | None, fields: list[str], qa: bool):
        """(examples the batcher encodes, English examples the forward reads, or None)."""
        if self.test_input == "english":
            return english, None
        if self.test_input == "fused":
            return concatenate_inputs(targets, english, fields, qa), None
        return targets, english if self.english_in_forward else None


@register
class ZeroShot(Method):
    pass


@register
class TranslateTest(Method):
    """The stage-1 model on the English translation of the target test set."""

    name = "translate_test"
    test_input = "english"


@register
class Lora(Method):
    """Translate-train: a fresh LoRA adapter on the target-language training data."""

    name = "lora"
    trains = True

    def build(self, cfg, stage1, mt_encoder=None):
        torch.manual_seed(cfg.seed)
        adapter = lora_config(cfg.model, cfg.train, _stage2_head(cfg))
        if keeps_stage1_adapter(stage1):
            # Merging would re-quantise 4-bit weights: stage 1 stays as a frozen adapter.
            stage1.add_adapter(STAGE2_ADAPTER, adapter)
            stage1.base_model.set_adapter([STAGE2_ADAPTER, stage1.active_adapter])
            for name, param in stage1.named_parameters():
                param.requires_grad_(f".{STAGE2_ADAPTER}." in name)
            return stage1
        return get_peft_model(stage1.merge_and_unload(), adapter, adapter_name=STAGE2_ADAPTER)


@register
class InputFusion(Lora):
    """English and target text concatenated into one input (double length), plain LoRA."""

    name = "input_fusion"
    test_input = "fused"


@register
class XMixup(Lora):
    """LoRA with X-Mixup at ``layers`` (``lambda0``, ``heads``); English read in the forward."""

    name = "xmixup"
    english_in_forward = True

    def check(self, cfg):
        if not 0 < float(self.cfg.lambda0) <= 1:
            raise ValueError(f"method.lambda0 must lie in (0, 1], got {self.cfg.lambda0}.")
        if int(self.cfg.heads) < 1:
            raise ValueError(f"method.heads must be a positive integer, got {self.cfg.heads}.")
        layers = self.cfg.layers
        if layers is not None and not all(isinstance(i, int) for i in ([layers] if isinstance(layers, int) else layers)):
            raise ValueError(f"method.layers must be layer indices (integers) or null, got {layers}.")

    def build(self, cfg, stage1, mt_encoder=None):
        model = super().build(cfg, stage1)
        return XMixupModel(model, STAGE2_ADAPTER, layers=self.cfg.layers, lambda0=self.cfg.lambda0,
                           heads=self.cfg.heads)


@register
class Flare(Method):
    """FLARE (``fusion``, ``heads``, ``alignment``, ``mask_source_padding``)."""

    name = "flare"
    trains = True
    english_in_forward = True
    LABELLED = ("fusion", "heads", "alignment", "mask_source_padding")  # named in the label when not default

    @property
    def label(self) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(FlareConfig) if f.name in self.LABELLED}
        parts = [self.name]
        if self.cfg.fusion != defaults["fusion"]:
            parts.append(self.cfg.fusion)
        if self.cfg.fusion == "cross_attention" and self.cfg.heads != defaults["heads"]:
            parts.append(f"h{self.cfg.heads}")
        if self.cfg.alignment != defaults["alignment"]:
            parts.append(self.cfg.alignment)
        if self.cfg.mask_source_padding != defaults["mask_source_padding"]:
            parts.append("unmasked")
        return "-".join(parts)

    def flare_config(self, cfg: DictConfig) -> FlareConfig:
        targets = cfg.model.lora_targets
        return FlareConfig(
            r=cfg.train.r, alpha=cfg.train.alpha, dropout=cfg.train.dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            fuse_modules=cfg.model.fuse_modules, fusion=self.cfg.fusion, heads=self.cfg.heads,
            alignment=self.cfg.alignment, mask_source_padding=self.cfg.mask_source_padding,
            modules_to_save=_stage2_head(cfg),
        )

    def check(self, cfg):
        self.flare_config(cfg)  # unknown fusion, alignment, r, ... raise here

    def build(self, cfg, stage1, mt_encoder=None):
        torch.manual_seed(cfg.seed)
        return get_flare_model(stage1, self.flare_config(cfg))


@register
class FlareMT(Flare):
    """FLARE MT: the frozen MT encoder (``encoder``) reads the target text; no English needed."""

    name = "flare_mt"
    english_in_forward = False
    needs_mt_encoder = True

    def build(self, cfg, stage1, mt_encoder=None):
        flare = super().build(cfg, stage1)
        encoder, width = mt_encoder
        return FlareMTModel(flare, encoder, width, _hidden_size(flare.hf_model))
