"""FLARE MT (spec section 6): the frozen encoder of an MT model reads the target-language input;
one trainable linear projection (d_mt -> d_model, shared by all layers) turns its last hidden
states into the source states of every fused projection. No translation is needed, at training
or at test time."""

from __future__ import annotations

import torch
from torch import nn

from .calls import TwoPassModel
from .model import FlareModel


class FlareMTModel(TwoPassModel):
    """A ``FlareModel`` whose source states come from an MT encoder through ``projection``.

    ``forward``/``generate`` take ``mt_input_ids``/``mt_attention_mask`` (the MT tokenization of
    the target text, with the target language's tag) instead of an English source; the rest goes
    to the FLARE model. Encoder states are computed here, batched and without gradients.
    """

    def __init__(self, flare: FlareModel, mt_encoder: nn.Module, d_mt: int, d_model: int):
        super().__init__()
        self.flare = flare
        self.mt_encoder = mt_encoder.eval()
        for param in self.mt_encoder.parameters():
            param.requires_grad_(False)
        reference = next(p for p in flare.parameters() if p.requires_grad)
        self.projection = nn.Linear(d_mt, d_model).to(reference.device, reference.dtype)

    @property
    def slot(self):
        return self.flare.slot

    @property
    def hf_model(self) -> nn.Module:
        return self.flare.hf_model

    def train(self, mode: bool = True):
        super().train(mode)
        self.mt_encoder.eval()  # frozen: no dropout either
        return self

    def source_states(self, mt_input_ids, mt_attention_mask) -> torch.Tensor:
        with torch.no_grad():
            states = self.mt_encoder(input_ids=mt_input_ids, attention_mask=mt_attention_mask).last_hidden_state
        return self.projection(states.to(self.projection.weight.dtype))

    def forward(self, mt_input_ids=None, mt_attention_mask=None, **kwargs):
        states = self.source_states(mt_input_ids, mt_attention_mask)
        return self.flare(source_states=states, source_attention_mask=mt_attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, mt_input_ids=None, mt_attention_mask=None, **kwargs):
        states = self.source_states(mt_input_ids, mt_attention_mask)
        return self.flare.generate(source_states=states, source_attention_mask=mt_attention_mask, **kwargs)


def load_mt_encoder(path: str, device, dtype: str = "auto") -> tuple[nn.Module, object, int]:
    """The encoder of a seq2seq MT model, its tokenizer and its width; ``dtype`` ``auto``: bf16 on
    a GPU (NLLB 3.3B's encoder in fp32 is 7 GB more of a job's memory for no gain: it is frozen
    and its states are projected), fp32 on the CPU."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=getattr(torch, dtype))
    encoder = model.get_encoder().to(device).eval()
    return encoder, AutoTokenizer.from_pretrained(path), model.config.d_model
