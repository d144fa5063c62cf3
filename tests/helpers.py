"""Helpers the test modules share, called with arguments (the data and configs they share are
fixtures in conftest.py; tiny random models are in tiny.py).

Plain functions, importable where a fixture cannot reach: in a process a test spawns
(test_ddp.py's workers), in a helper a test calls.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# A small, fast demo run: 48 training and 24 test examples, one epoch of each stage.
SMALL = ("task=demo", "mt=gold", "data.max_train=48", "data.max_test=24", "train.epochs=1",
         "train.batch_size=16", "train.lr=1e-3", "train.eval_batch_size=32", "data.max_validation=24", "stage1.epochs=1",
         "stage1.batch_size=16", "stage1.lr=1e-3")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
# The real development data (NusaX, XNLI, TyDiQA) where a checkout has it beside it.
DATA = Path(os.environ.get("FLARE_DATA_DIR", ROOT.parent / "shared" / "data"))


# -- configs and runs ------------------------------------------------------------------------
def make_cfg(overrides, output_dir=None):
    """The composed root config with ``overrides`` (and ``output_dir``, where given)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"output_dir={output_dir}"] if output_dir is not None else []
        return compose(config_name="config", overrides=list(overrides) + extra)


def demo_cfg(model, method, output_dir, extra=()):
    """The demo task in dmb (gold English) with ``model`` and ``method``."""
    return make_cfg([f"model={model}", f"method={method}", "task=demo", "lang=dmb", "mt=gold", *extra], output_dir)


def run_path(root: Path, rel: str) -> Path:
    """The one run directory ``rel`` + ``-<run id>`` (e.g. runs/demo/tiny-bert/gold/flare/dma/seed100)."""
    found = sorted(Path(root).glob(rel + "-*"))
    assert len(found) == 1, (rel, found)
    return found[0]


def offline_env(**extra) -> dict:
    return dict(os.environ, **OFFLINE, **extra)


def run_py(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    """``python run.py *args`` offline, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=offline_env(),
                          capture_output=True, text=True, timeout=timeout)


def fresh_stage1(cfg):
    """(the run's Setup, the base model on the CPU with a fresh stage-1 LoRA adapter on it): a
    stage-1 model without training one."""
    from peft import get_peft_model

    from flare_exp import adapters
    from flare_exp.models import load_base_model
    from flare_exp.setup import Setup

    setup = Setup(cfg)
    labels = list(cfg.task.labels) if cfg.task.labels else None
    base = load_base_model(cfg.model, setup.tokenizer, labels, torch.device("cpu"), setup.cache_dir, cfg.seed)
    return setup, get_peft_model(base, adapters.lora_config(cfg.model, cfg.stage1))


# -- data files ------------------------------------------------------------------------------
def squad_file(path, lang, n, seed):
    """A SQuAD-format file of ``n`` questions (one a paragraph), each answered by a year."""
    data = []
    for i in range(n):
        year = str(1900 + (i * 7 + seed) % 100)
        context = f"The person number {i} was born in {year} in a town near the river."
        data.append({"paragraphs": [{"context": context, "qas": [{
            "id": f"{lang}-{seed}-{i}", "question": f"When was person {i} born?",
            "answers": [{"text": year, "answer_start": context.index(year)}]}]}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))


# -- the FLARE core --------------------------------------------------------------------------
def reference_index(target_mask, source_mask, strategy, anchor, prompt_lengths=None):
    """Loop-by-loop reading of spec section 4."""
    rows = []
    for b in range(target_mask.shape[0]):
        t_pos = [i for i, v in enumerate(target_mask[b].tolist()) if v]
        s_pos = [i for i, v in enumerate(source_mask[b].tolist()) if v]
        prompt = len(t_pos) if prompt_lengths is None else int(prompt_lengths[b])
        row = [-1] * target_mask.shape[1]
        for k, i in enumerate(t_pos):
            if not s_pos:
                continue
            if k >= prompt:
                row[i] = s_pos[-1]
                continue
            if strategy == "position":
                j = k if anchor == "start" else len(s_pos) - prompt + k
            else:
                j = min(math.floor(Fraction(k * len(s_pos), prompt) + Fraction(1, 2)), len(s_pos) - 1)
            row[i] = s_pos[j] if 0 <= j < len(s_pos) else -1
        rows.append(row)
    return torch.tensor(rows)


TARGETS = {
    "llama": "all-linear",
    "gemma2": "all-linear",
    "qwen2": "all-linear",
    "bert": ["query", "key", "value", "dense"],
    "xlmr": ["query", "value"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}


def inputs(family, seed=0):
    """A padded target batch and a padded source batch of other lengths."""
    from tiny import pad_side, padded_batch

    side = pad_side(family)
    ids, mask = padded_batch([6, 9, 4], side, seed)
    source_ids, source_mask = padded_batch([7, 5, 8], side, seed + 100)
    batch = dict(input_ids=ids, attention_mask=mask)
    if family == "t5":
        batch["decoder_input_ids"] = padded_batch([3, 3, 3], "right", seed + 200)[0]
    return batch, dict(source_input_ids=source_ids, source_attention_mask=source_mask)


def flare_config(family, **kwargs):
    from flare_exp.flare import FlareConfig

    return FlareConfig(r=8, alpha=16, target_modules=TARGETS[family], **kwargs)


def weighted_loss(logits, seed=7):
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * weights).sum()


def lora_grads(model, adapter):
    return {
        n.replace(f".{adapter}.", "."): p.grad.clone()
        for n, p in model.named_parameters()
        if "lora_" in n and p.grad is not None
    }


def capture_input(model, module_name, **call):
    """The input ``module_name`` sees when ``model`` runs on ``call`` (last call wins)."""
    seen = {}
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out))
    try:
        with torch.no_grad():
            model(**call)
    finally:
        handle.remove()
    return seen["x"]


def checkpointed_grads(base, family, batches, checkpointing: bool, reentrant: bool = False) -> dict:
    """FLARE's LoRA gradients on a copy of ``base`` after one backward of the summed weighted
    losses of ``batches`` ((target, source) pairs), with or without gradient checkpointing."""
    from flare_exp.flare import get_flare_model
    from tiny import randomize_lora

    flare = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="add_relu"))
    randomize_lora(flare.peft_model, seed=3, scale=0.3)
    flare.train()
    if checkpointing:
        flare.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        flare.hf_model.enable_input_require_grads()
        assert flare.hf_model.is_activation_checkpointing
    sum(weighted_loss(flare(**t, **s).logits, seed=7 + i) for i, (t, s) in enumerate(batches)).backward()
    return lora_grads(flare.peft_model, "flare")


def assert_same_grads(expected, got, scale_tolerance=1e-4):
    assert expected.keys() == got.keys() and expected
    for name, reference in expected.items():
        # Recomputation reorders float32 sums: T5 differs by ~1e-5 of the gradient's scale even
        # with plain LoRA. A source dropped during recomputation, or another batch's English,
        # changes it by the gradient's own size.
        tolerance = 1e-6 + scale_tolerance * reference.abs().max().item()
        torch.testing.assert_close(got[name], reference, atol=tolerance, rtol=0, msg=name)


def load_4bit(path, protect=True):
    """The tiny Llama saved in ``path``, loaded in NF4; ``protect``: with the CPU repack off (on
    CPUs with AVX512-BF16 an eval forward through repacked tiny 4-bit layers fails), as the
    pipeline loads it."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from flare_exp.flare import disable_cpu_bf16_repack

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if protect:
        disable_cpu_bf16_repack(model)
    return model.eval()
