"""X-Mixup (Yang et al., ICLR 2022) re-implemented on unmodified transformers models.

At chosen layers the target hidden states cross-attend to the English hidden states of the same
example, and the layer output becomes ``(1 - lambda) h_t + lambda CrossAttn(h_t, h_s)``, with a
per-token ratio predicted from the entropy of the cross-attention: ``lambda = lambda_0 *
sigmoid(w * H + b)``, H the attention entropy normalised by the log of the number of source
tokens, so lambda stays in (0, lambda_0). The English states come from a source pass through
the stage-1 model (stage-2 adapter off, no gradients), as FLARE's do, and English is needed at
test time too.

Choices the original leaves open here: the mixing layers (default: the middle layer), one
multi-head attention (own parameters) per mixing layer, the entropy gate (w, b) above, and no
consistency losses beyond the task loss. Beam search is not supported; gradient checkpointing
is (each call's English states are its own, as FLARE's are).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .flare.calls import CallSlot, TwoPassModel
from .flare.layers import MissingSourceError, SourcePassDone


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers (the encoder's for encoder-decoder models)."""
    config = model.config
    root = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError("Could not find the model's list of transformer layers.")


class MixupLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, lambda0: float):
        super().__init__()
        if not 0 < lambda0 < 1:
            raise ValueError(f"lambda0 must lie in (0, 1), got {lambda0}.")
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.gate = nn.Linear(1, 1)
        self.lambda0 = lambda0

    def forward(self, target, source, source_mask):
        """The mixed states, in the layer's dtype (a bf16 model's hidden states meet the mixer's
        trainable weights, which are fp32 as the LoRA weights are: the mixing runs in fp32)."""
        keep, dtype = source_mask.bool(), self.attention.in_proj_weight.dtype
        query, source = target.to(dtype), source.to(dtype)
        mixed, weights = self.attention(query, source, source, key_padding_mask=~keep, need_weights=True)
        p = weights.clamp_min(1e-12)
        entropy = -(p * p.log()).sum(-1, keepdim=True)
        entropy = entropy / math.log(max(int(keep.sum(-1).max()), 2))
        ratio = self.lambda0 * torch.sigmoid(self.gate(entropy.to(self.gate.weight.dtype)))
        return ((1 - ratio) * query + ratio * mixed).to(target.dtype), ratio


@contextmanager
def without_adapter(model: nn.Module, name: str):
    """Run with adapter ``name`` off and every other active adapter (a frozen stage 1) on,
    leaving which parameters train untouched."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [m._active_adapter for m in layers]
    for layer in layers:
        layer._active_adapter = [a for a in layer.active_adapters if a != name]
    try:
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer._active_adapter = active


class MixupCall:
    """The state of one X-Mixup call: the English hidden states of the mixing layers."""

    def __init__(self):
        self.mode = "source"
        self.records: dict[int, torch.Tensor] = {}
        self.source_mask: torch.Tensor | None = None

    def checkpoint_inputs(self) -> tuple:
        return ()  # the English states are recorded without gradients


class XMixupModel(TwoPassModel):
    """A stage-2 PEFT (LoRA) model with X-Mixup at ``layers``; see the module docstring."""

    def __init__(self, peft_model, stage2_adapter: str, layers=None, lambda0: float = 0.5, heads: int = 1):
        super().__init__()
        self.peft_model = peft_model
        self.stage2_adapter = stage2_adapter
        self.slot = CallSlot()
        hf = self.hf_model
        self.is_encoder_decoder = bool(getattr(hf.config, "is_encoder_decoder", False))
        blocks = transformer_blocks(hf)
        layers = [len(blocks) // 2] if layers is None else list(layers)
        d_model = getattr(hf.config, "hidden_size", None) or hf.config.d_model
        reference = next(p for p in peft_model.parameters() if p.requires_grad)
        self.mixers = nn.ModuleDict(
            {str(i): MixupLayer(d_model, heads, lambda0).to(reference.device, reference.dtype) for i in layers}
        )
        self.last_ratios: dict[int, torch.Tensor] = {}
        for i in layers:
            blocks[i].register_forward_hook(self._hook(i))

    @property
    def hf_model(self) -> nn.Module:
        return self.peft_model.base_model.model

    def _hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            call = self.slot.active
            if call is None:
                raise MissingSourceError(
                    "X-Mixup needs the English source: call the X-Mixup model with "
                    "source_input_ids/source_attention_mask."
                )
            if call.mode == "source":
                call.records[index] = hidden.detach()
                if len(call.records) == len(self.mixers):  # the later layers and the head are not needed
                    raise SourcePassDone
                return None
            source = call.records[index]
            if source.shape[0] != hidden.shape[0]:
                raise ValueError("X-Mixup needs one English example per target example (no beam search).")
            mixed, ratio = self.mixers[str(index)](hidden, source, call.source_mask)
            self.last_ratios[index] = ratio
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return hook

    def source_pass(self, source_input_ids, source_attention_mask) -> MixupCall:
        """A new call holding the English hidden states of the mixing layers (stage-2 adapter
        off, no gradients, eval mode; it stops after the last mixing layer; train mode and the
        active call restored whatever happens)."""
        call = MixupCall()
        hf = self.hf_model
        was_training = hf.training
        hf.eval()
        try:
            with torch.no_grad(), without_adapter(self.peft_model, self.stage2_adapter), self.slot.running(call):
                if self.is_encoder_decoder:
                    hf.get_encoder()(input_ids=source_input_ids, attention_mask=source_attention_mask)
                else:
                    hf(input_ids=source_input_ids, attention_mask=source_attention_mask)
        except SourcePassDone:
            pass
        finally:
            hf.train(was_training)
        call.mode, call.source_mask = "target", source_attention_mask
        return call

    def _new_call(self, source_input_ids, source_attention_mask) -> MixupCall:
        if source_input_ids is None:
            raise ValueError("X-Mixup needs the English source: pass source_input_ids/source_attention_mask.")
        if source_attention_mask is None:
            source_attention_mask = torch.ones_like(source_input_ids)
        self.slot.bind_checkpointing(self.hf_model)
        return self.source_pass(source_input_ids, source_attention_mask)

    def forward(self, source_input_ids=None, source_attention_mask=None, target_prompt_lengths=None, **kwargs):
        """``target_prompt_lengths`` (of FLARE's alignment) is accepted and not needed."""
        call = self._new_call(source_input_ids, source_attention_mask)
        with self.slot.running(call):
            return self.peft_model(**kwargs)

    @torch.no_grad()
    def generate(self, source_input_ids=None, source_attention_mask=None, **kwargs):
        call = self._new_call(source_input_ids, source_attention_mask)
        with self.slot.running(call):
            return self.hf_model.generate(**kwargs)
