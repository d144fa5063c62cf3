"""Tiny randomly initialised transformers models, built from config (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

VOCAB = 128
PAD = 0


def _decoder_kwargs(hidden=32, layers=2):
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )


def _encoder_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=PAD,
        max_position_embeddings=256,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_decoder_kwargs())),
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(**_decoder_kwargs(), head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_decoder_kwargs())),
    "bert": lambda: BertForSequenceClassification(BertConfig(**_encoder_kwargs())),
    "xlmr": lambda: XLMRobertaForSequenceClassification(XLMRobertaConfig(**_encoder_kwargs())),
    "t5": lambda: T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=PAD,
            eos_token_id=2,
            decoder_start_token_id=PAD,
            dropout_rate=0.0,
        )
    ),
}
DECODERS = ("llama", "gemma2", "qwen2")
ENCODERS = ("bert", "xlmr")
FAMILIES = tuple(BUILDERS)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    model.config.use_cache = False
    return model.eval()


def padded_batch(lengths, pad_side: str, seed: int, max_len: int | None = None):
    """Random token ids (>= 3) with the given real lengths, padded on ``pad_side``."""
    gen = torch.Generator().manual_seed(seed)
    width = max_len or max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (n,), generator=gen)
        span = slice(width - n, width) if pad_side == "left" else slice(0, n)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def pad_side(family: str) -> str:
    return "left" if family in DECODERS else "right"


def randomize_lora(model, seed: int = 1, scale: float = 0.2):
    """Give every LoRA A/B (and fusion) parameter random values so that B != 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
