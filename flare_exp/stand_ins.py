"""Stand-ins of the paper's models for rehearsing their jobs on a CPU (``flare_exp.rehearse``):
each model's published configuration (vocabulary, position limit, head dimension, attention and
key-value heads, tied embeddings, sliding window, soft-capping, activations, dropout, norms) with
its layers and widths shrunk, random weights saved as a hub checkpoint is (loaded by the same
``from_pretrained`` with the job's dtype, 4-bit quantization and attention); its real tokenizer
where one ships in a package (XLM-R's SentencePiece ``tokenizer.json``), else a byte-level stand-in
with the real vocabulary size, special tokens, their ids and what the real one adds around a
text; and an NLLB-shaped translator whose tokenizer holds NLLB-200's language codes.

The published values are the models' ``config.json`` on the hub (Llama 3.1 8B, Gemma 2 9B,
XLM-R large, mT5-XL, NLLB-200 3.3B).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .models import package_path, save_once

# The published configuration of each model, and what is shrunk (layers and widths only).
PUBLISHED = {
    "llama3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "gemma2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, max_position_embeddings=8192,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "xlmr-large": dict(
        model_type="xlm-roberta", vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1),
    "mt5-xl": dict(
        model_type="mt5", vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
        num_heads=32, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.1, layer_norm_epsilon=1e-6),
}
# Layers and widths only: 2 layers (Gemma 2: one sliding-window and one global), narrow hidden
# and feed-forward widths; the head dimension and the numbers of heads stay as published
# (XLM-R: its head dimension of 64 with 2 heads, as an encoder's width is heads x head dimension).
SHRUNK = {
    "llama3.1-8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    "gemma2-9b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    "xlmr-large": dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=2),
    "mt5-xl": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2),
}
# The tokenizers: the real one from a package, or the stand-in's vocabulary size, special
# tokens (id, text) and template ($A: the text).
XLMR_TOKENIZER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"  # XLM-R's SentencePiece
TOKENIZERS = {
    "llama3.1-8b": dict(vocab=128256, specials={"bos": (128000, "<|begin_of_text|>"), "eos": (128001, "<|end_of_text|>")},
                        template="bos $A", reserved=(128002, "<|reserved_special_token_{}|>")),
    "gemma2-9b": dict(vocab=256000, specials={"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"),
                                              "unk": (3, "<unk>")}, template="bos $A"),
    "mt5-xl": dict(vocab=250100, specials={"pad": (0, "<pad>"), "eos": (1, "</s>"), "unk": (2, "<unk>")},
                   template="$A eos"),
}
NLLB_PUBLISHED = dict(vocab_size=256206, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, decoder_start_token_id=2, scale_embedding=True)


VERSION = 2  # of the stand-ins' making: part of their folders' names, with their specification


def _digest(*spec) -> str:
    """A short hash of a stand-in's specification: its folder changes where it does."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([VERSION, *spec], sort_keys=True).encode()).hexdigest()[:10]


def config_of(name: str):
    """The shrunk ``PretrainedConfig`` of the model ``name`` (a key of ``PUBLISHED``)."""
    from transformers import AutoConfig

    values = {**PUBLISHED[name], **SHRUNK[name]}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if config.model_type == "xlm-roberta":
        return AutoModelForMaskedLM  # as the hub checkpoint: the task heads are new in every job
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def model_folder(name: str, root: Path) -> Path:
    """A saved stand-in of the model ``name`` (random weights in fp32, as a checkpoint on disk)."""
    def write(staging: Path) -> None:
        config = config_of(name)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = _model_class(config).from_config(config)
            head = model.get_output_embeddings()
            if not PUBLISHED[name].get("tie_word_embeddings", True) and head is not None:
                # An LM head of its own, as the checkpoint has it (transformers 5 builds mT5 tied, and
                # unties it on loading where the checkpoint's head differs from the embeddings).
                head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * 0.02)
            model.save_pretrained(staging)

    return save_once(root / "models" / f"{name}-{_digest(PUBLISHED[name], SHRUNK[name])}", write)


def tokenizer_folder(name: str, root: Path) -> Path:
    """The tokenizer of the model ``name``: XLM-R's own, else the stand-in, saved."""
    def write(staging: Path) -> None:
        if name == "xlmr-large":
            from transformers import XLMRobertaTokenizerFast

            XLMRobertaTokenizerFast(tokenizer_file=str(package_path(XLMR_TOKENIZER)),
                                    model_max_length=512).save_pretrained(staging)
        else:
            byte_tokenizer(**TOKENIZERS[name]).save_pretrained(staging)
        (staging / "config.json").write_text("{}")  # save_once's mark of a finished folder

    return save_once(root / "tokenizers" / f"{name}-{_digest(TOKENIZERS.get(name))}", write)


def byte_tokenizer(vocab: int, specials: dict[str, tuple[int, str]], template: str,
                   reserved: tuple[int, str] | None = None):
    """A byte-level tokenizer of ``vocab`` ids: the special tokens at their ids, a token per UTF-8
    byte (so every script has its tokens, a text some four times as many as a real tokenizer
    gives it), unused fillers up to ``vocab`` (``reserved``: (first id, name pattern) of the
    named reserved tokens from there), and ``template`` around each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table: dict[str, int] = {text: i for i, text in specials.values()}
    taken = set(table.values())
    free = iter([i for i in range(vocab) if i not in taken])
    for char in pre_tokenizers.ByteLevel.alphabet():
        table[char] = next(free)
    for i in free:
        table[reserved[1].format(i - reserved[0]) if reserved and i >= reserved[0] else f"<unused{i}>"] = i
    tokenizer = Tokenizer(models.BPE(vocab=table, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    names = {role: text for role, (_, text) in specials.items()}
    tokenizer.add_special_tokens(list(names.values()))
    single = " ".join(names[part] if part in names else part for part in template.split())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} {single.replace('$A', '$B:1')}",
        special_tokens=[(names[p], specials[p][0]) for p in template.split() if p in names])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=10 ** 6,
                                   **{f"{role}_token": text for role, text in names.items()})


LATIN_EXTRA = string.ascii_letters + string.digits + string.punctuation + "«»"


def nllb_folder(root: Path, chars: str) -> Path:
    """An NLLB-shaped translator (M2M-100, NLLB-200's vocabulary size, position limit and special
    ids, a width of 32) whose tokenizer is NLLB's, with all of NLLB-200's language codes, over a
    character vocabulary ``chars`` (each character a token)."""
    def write(staging: Path) -> None:
        from transformers import M2M100Config, M2M100ForConditionalGeneration
        from transformers.models.nllb.tokenization_nllb import NllbTokenizer

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for char in dict.fromkeys("▁" + chars):
            vocab.setdefault(char, len(vocab))
        tokenizer = NllbTokenizer(vocab=vocab, merges=[], src_lang="eng_Latn")
        tokenizer.save_pretrained(staging)
        config = M2M100Config(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, **NLLB_PUBLISHED)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            M2M100ForConditionalGeneration(config).save_pretrained(staging)

    return save_once(root / "models" / f"nllb-{_digest(NLLB_PUBLISHED, chars)}", write)
