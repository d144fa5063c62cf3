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
consistency losses beyond the task loss. Gradient checkpointing and beam search are not
supported.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


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
        keep = source_mask.bool()
        mixed, weights = self.attention(target, source, source, key_padding_mask=~keep, need_weights=True)
        p = weights.clamp_min(1e-12)
        entropy = -(p * p.log()).sum(-1, keepdim=True)
        entropy = entropy / math.log(max(int(keep.sum(-1).max()), 2))
        ratio = self.lambda0 * torch.sigmoid(self.gate(entropy.to(self.gate.weight.dtype)))
        return (1 - ratio) * target + ratio * mixed, ratio


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


class XMixupModel(nn.Module):
    """A stage-2 PEFT (LoRA) model with X-Mixup at ``layers``; see the module docstring."""

    def __init__(self, peft_model, stage2_adapter: str, layers=None, lambda0: float = 0.5, heads: int = 1):
        super().__init__()
        self.peft_model = peft_model
        self.stage2_adapter = stage2_adapter
        hf = peft_model.base_model.model
        self.is_encoder_decoder = bool(getattr(hf.config, "is_encoder_decoder", False))
        blocks = transformer_blocks(hf)
        layers = [len(blocks) // 2] if layers is None else list(layers)
        d_model = getattr(hf.config, "hidden_size", None) or hf.config.d_model
        reference = next(p for p in peft_model.parameters() if p.requires_grad)
        self.mixers = nn.ModuleDict(
            {str(i): MixupLayer(d_model, heads, lambda0).to(reference.device, reference.dtype) for i in layers}
        )
        self._mode = None
        self._records: dict[int, torch.Tensor] = {}
        self._source_mask = None
        self.last_ratios: dict[int, torch.Tensor] = {}
        for i in layers:
            blocks[i].register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self._mode == "source":
                self._records[index] = hidden.detach()
                return None
            if self._mode != "target":
                raise RuntimeError("X-Mixup needs the English source: pass source_input_ids/source_attention_mask.")
            source = self._records[index]
            if source.shape[0] != hidden.shape[0]:
                raise ValueError("X-Mixup needs one English example per target example (no beam search).")
            mixed, ratio = self.mixers[str(index)](hidden, source, self._source_mask)
            self.last_ratios[index] = ratio
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return hook

    def _source_pass(self, source_input_ids, source_attention_mask) -> None:
        hf = self.peft_model.base_model.model
        was_training = hf.training
        self._mode, self._records = "source", {}
        hf.eval()
        try:
            with torch.no_grad(), without_adapter(self.peft_model, self.stage2_adapter):
                if self.is_encoder_decoder:
                    hf.get_encoder()(input_ids=source_input_ids, attention_mask=source_attention_mask)
                else:
                    hf(input_ids=source_input_ids, attention_mask=source_attention_mask)
        finally:
            hf.train(was_training)
        self._mode, self._source_mask = "target", source_attention_mask

    def forward(self, source_input_ids=None, source_attention_mask=None, **kwargs):
        self._source_pass(source_input_ids, source_attention_mask)
        return self.peft_model(**kwargs)

    @torch.no_grad()
    def generate(self, source_input_ids=None, source_attention_mask=None, **kwargs):
        self._source_pass(source_input_ids, source_attention_mask)
        return self.peft_model.base_model.model.generate(**kwargs)
