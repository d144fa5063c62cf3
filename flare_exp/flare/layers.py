"""PEFT LoRA layers that fuse source and target states (spec sections 2 and 3).

Every LoRA target of a FLARE model becomes one of these layers (registered through PEFT's
custom-module mechanism). Each adapter of a layer is either plain LoRA or, where
``lora_fusion`` holds an entry for it, a FLARE adapter computing

    y = W x_t + s * B phi(A x_s, A x_t)

with ``x_s`` the input this very layer saw in the source pass. Per-call inputs (the source
states, the alignment map) reach the layers through the ``SourceCall`` that is active in the
model's ``CallSlot`` (see ``calls.py``), never through forward kwargs.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .alignment import gather_aligned


class SourcePassDone(Exception):
    """Raised once every fused layer has recorded its source input: the rest is not needed."""


class MissingSourceError(RuntimeError):
    pass


class SourceCall:
    """The state of one FLARE call: in mode ``"source"`` the fused layers record their inputs
    (FLARE adapters off), in mode ``"target"`` they fuse them through the alignment map."""

    def __init__(self, causal: bool, flare_adapters: set[str], expected: int):
        self.causal = causal
        self.flare_adapters = flare_adapters
        self.expected = expected
        self.mode = "source"
        self.fuses = True  # False: the fused layers run plain LoRA (without_fusion)
        self.records: dict[int, torch.Tensor] = {}
        self.shared: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.target_mask: torch.Tensor | None = None

    def record(self, layer: nn.Module, x: torch.Tensor) -> None:
        key = id(layer)
        if key in self.records:
            raise RuntimeError(
                f"{type(layer).__name__} ran twice in one source pass; FLARE needs every fused "
                "module to run once per forward (modules with shared weights cannot fuse)."
            )
        self.records[key] = x
        if len(self.records) == self.expected:
            raise SourcePassDone

    def start_target(self, index: torch.Tensor, target_mask: torch.Tensor | None, shared=None) -> None:
        self.mode = "target"
        self.index = index
        self.target_mask = target_mask
        self.shared = shared

    def checkpoint_inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors of this call that need gradients (given source states, FLARE MT)."""
        return (self.shared,) if self.shared is not None and self.shared.requires_grad else ()

    def with_inputs(self, tensors: tuple[torch.Tensor, ...]) -> "SourceCall":
        """This call with ``checkpoint_inputs`` replaced by ``tensors`` (a recomputation's)."""
        call = copy.copy(self)
        (call.shared,) = tensors
        return call

    def without_fusion(self) -> "SourceCall":
        """This call with its fused layers running plain LoRA: lora_B(lora_A(x)), no source (the
        public code's checkpointed layers, which get no source states)."""
        call = copy.copy(self)
        call.fuses = False
        return call

    def source_for(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.index.shape != x.shape[:2]:
            raise MissingSourceError(
                f"The alignment map covers {tuple(self.index.shape)} target positions but "
                f"{layer.flare_name} got an input of {tuple(x.shape[:2])}."
            )
        if self.shared is not None:
            return self.shared
        source = self.records.get(id(layer))
        if source is None:
            raise MissingSourceError(
                f"{layer.flare_name} recorded no input in the source pass (it did not run there); "
                "only modules that the source pass reaches can fuse."
            )
        return source


class FlareLayerMixin:
    """The FLARE part shared by the nn.Linear and bitsandbytes Linear4bit layers."""

    def _init_flare(self) -> None:
        self.lora_fusion = nn.ModuleDict()
        self.flare_name = ""
        self._flare_slot = None  # the model's CallSlot, set by get_flare_model

    @property
    def is_fused(self) -> bool:
        return len(self.lora_fusion) > 0

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        fused = [n for n in names if n in self.lora_fusion]
        if fused:
            raise ValueError(
                f"FLARE adapter(s) {fused} depend on the source input and cannot be merged into "
                "the weights."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _check_forward_args(self, x, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("FLARE layers do not support mixed-adapter batches (adapter_names).")
        super()._check_forward_args(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        call = self._active_call()
        if call is not None and call.mode == "source" and self.is_fused:
            call.record(self, x)  # before the base output: the last fused layer stops here
        return self._add_adapters(x, self._base_output(x, *args, **kwargs))

    def _active_call(self) -> SourceCall | None:
        return self._flare_slot.active if self._flare_slot is not None else None

    def _base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "flare." + nn.Module.__repr__(self)

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + the contribution of every active adapter, fused where configured."""
        call = self._active_call()
        source_pass = call is not None and call.mode == "source"
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            if source_pass and name in call.flare_adapters:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            target = lora_A(dropout(xa))
            if name in self.lora_fusion:
                if call is None:
                    raise MissingSourceError(
                        f"A FLARE-fused layer ({self.flare_name}) ran without source states: call the "
                        "FLARE model with source_input_ids/source_attention_mask (or source_states), "
                        "or disable the FLARE adapter for plain inference."
                    )
                if call.fuses:
                    source = self._cast_input_dtype(call.source_for(self, x), lora_A.weight.dtype)
                    aligned = gather_aligned(lora_A(dropout(source)), call.index)
                    target = self.lora_fusion[name](aligned, target, call.target_mask, call.causal)
            result = result + (lora_B(target) * scaling).to(out_dtype)
        return result


class FlareLinear(FlareLayerMixin, LoraLinear):
    """LoRA / FLARE on ``torch.nn.Linear``."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        LoraLinear.__init__(self, base_layer, adapter_name, config=config, **kwargs)
        self._init_flare()


def custom_module_mapping() -> dict[type, type]:
    """Base layer type -> FLARE layer type, most specific first (Linear4bit is an nn.Linear)."""
    mapping: dict[type, type] = {}
    linear4bit = _linear4bit_class()
    if linear4bit is not None:
        mapping[linear4bit[0]] = linear4bit[1]
    mapping[nn.Linear] = FlareLinear
    return mapping


_LINEAR4BIT = None


def _linear4bit_class():
    """(bnb.nn.Linear4bit, FlareLinear4bit), or None without bitsandbytes."""
    global _LINEAR4BIT
    if _LINEAR4BIT is None:
        try:
            import bitsandbytes as bnb
            from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        except ImportError:
            _LINEAR4BIT = ()
            return None

        class FlareLinear4bit(FlareLayerMixin, LoraLinear4bit):
            """LoRA / FLARE on bitsandbytes ``Linear4bit`` (frozen NF4/FP4 base weights)."""

            def __init__(self, base_layer, adapter_name, config, **kwargs):
                LoraLinear4bit.__init__(self, base_layer, adapter_name, config=config, **kwargs)
                self._init_flare()

            def _base_output(self, x, *args, **kwargs):
                # bitsandbytes may return a view that backprop cannot modify in place.
                return self.base_layer(x, *args, **kwargs).clone()

        _LINEAR4BIT = (bnb.nn.Linear4bit, FlareLinear4bit)
    return _LINEAR4BIT or None
