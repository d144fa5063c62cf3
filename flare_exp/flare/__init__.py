"""FLARE: fusion of source (English) and target representations inside LoRA adapters.

Depends on torch, transformers and peft only, so it can be lifted into other training code::

    from flare_exp.flare import FlareConfig, get_flare_model
    flare = get_flare_model(stage1_model, FlareConfig(fusion="add_relu"))
    out = flare(input_ids=..., attention_mask=..., labels=...,
                source_input_ids=..., source_attention_mask=...)

The model aligns source and target itself (``FlareConfig.alignment``/``anchor``). For a causal
LM the prompt is the real tokens before the first label that is not -100 (or pass
``target_prompt_lengths``); answer tokens fuse the last source position, as in generation.
"""

from .alignment import build_source_index, gather_aligned, last_source_position
from .calls import TwoPassModel, enable_gradient_checkpointing
from .config import FlareConfig, resolve_fuse_modules
from .fusion import FUSIONS
from .layers import MissingSourceError
from .model import FlareModel, disable_cpu_bf16_repack, get_flare_model

load_flare_model = FlareModel.from_pretrained

__all__ = [
    "FUSIONS",
    "FlareConfig",
    "FlareModel",
    "MissingSourceError",
    "TwoPassModel",
    "build_source_index",
    "disable_cpu_bf16_repack",
    "enable_gradient_checkpointing",
    "gather_aligned",
    "get_flare_model",
    "last_source_position",
    "load_flare_model",
    "resolve_fuse_modules",
]
