"""The methods of the paper piece by piece: input fusion, FLARE MT, X-Mixup, 4-bit, the task head
(every method end to end on every model kind: test_golden.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import get_peft_model

from flare_exp import adapters
from flare_exp.data import load_examples
from flare_exp.data.formats import SEPARATOR, concatenate_inputs
from flare_exp.flare import FlareConfig, get_flare_model
from flare_exp.flare.mt import FlareMTModel
from flare_exp.methods import method_for
from flare_exp.setup import Setup
from flare_exp.stages import run
from flare_exp.train import train_model
from flare_exp.xmixup import XMixupModel
from helpers import CONF, ROOT, demo_cfg, fresh_stage1


def test_input_fusion_feeds_both_texts(tmp_path):
    cfg = demo_cfg("tiny-bert", "input_fusion", tmp_path)
    setup = Setup(cfg)
    tokenizer, batcher = setup.tokenizer, setup.batcher
    assert batcher.max_length == 2 * cfg.task.max_length
    target, english = load_examples("demo", "dmb", "test")[:2], load_examples("demo", "en", "test")[:2]
    fused = concatenate_inputs(target, english, ["text"], qa=False)
    assert fused[0]["text"] == english[0]["text"] + SEPARATOR + target[0]["text"]
    decoded = tokenizer.decode(batcher(fused)["input_ids"][0], skip_special_tokens=True)
    assert english[0]["text"].split()[1] in decoded and target[0]["text"].split()[0] in decoded
    qa = [{"id": "q", "question": "When?", "context": "Born in 1999.",
           "answers": [{"text": "1999", "answer_start": 8}]}]
    en = [{"id": "q", "question": "Lini?", "context": "Alizaliwa 1999.", "answers": []}]
    (example,) = concatenate_inputs(qa, en, ["context", "question"], qa=True)
    start = example["answers"][0]["answer_start"]
    assert example["context"][start:start + 4] == "1999" and example["context"].startswith("Alizaliwa")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the paper's decoders and mT5
def test_xmixup_ratio_stays_below_lambda0_and_trains(tmp_path, dtype):
    cfg = demo_cfg("tiny-llama", "xmixup", tmp_path, [f"model.dtype={dtype}"])
    setup, stage1 = fresh_stage1(cfg)
    model = XMixupModel(get_peft_model(stage1.merge_and_unload(), adapters.lora_config(cfg.model, cfg.train), adapter_name="stage2"),
                        "stage2", layers=[0, 1], lambda0=0.5)
    batcher = setup.batcher
    batch = batcher(load_examples("demo", "dmb", "train")[:8], load_examples("demo", "en", "train")[:8])
    model.train()
    model(**batch).loss.backward()
    assert sorted(model.last_ratios) == [0, 1]
    for ratio in model.last_ratios.values():
        assert bool((ratio > 0).all()) and bool((ratio < 0.5).all())
    for name, param in model.mixers.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.requires_grad for p in model.mixers.parameters())


def test_the_xmixup_source_pass_stops_after_the_last_mixing_layer(tmp_path):
    """Only the mixing layers' English states are read: the source pass runs no later layer (nor
    the LM head); the target pass runs them all."""
    cfg = demo_cfg("tiny-llama", "xmixup", tmp_path)
    setup, stage1 = fresh_stage1(cfg)
    model = XMixupModel(get_peft_model(stage1.merge_and_unload(), adapters.lora_config(cfg.model, cfg.train), adapter_name="stage2"),
                        "stage2", layers=[0], lambda0=0.5)
    batch = setup.batcher(load_examples("demo", "dmb", "train")[:4], load_examples("demo", "en", "train")[:4])
    hf = model.hf_model
    runs = {"layer 0": 0, "layer 1": 0, "head": 0}
    for name, module in (("layer 0", hf.model.layers[0]), ("layer 1", hf.model.layers[1]), ("head", hf.lm_head)):
        module.register_forward_pre_hook(lambda *_, name=name: runs.__setitem__(name, runs[name] + 1))
    model(**batch)
    assert runs == {"layer 0": 2, "layer 1": 1, "head": 1}


def test_flare_mt_trains_the_projection_and_keeps_the_mt_encoder_frozen(tmp_path):
    cfg = demo_cfg("tiny-bert", "flare_mt", tmp_path, ["++method.encoder=tiny"])
    setup, stage1 = fresh_stage1(cfg)
    mt = setup.mt_encoder  # the tiny random NLLB encoder, its tokenizer and width
    flare = get_flare_model(stage1, FlareConfig(target_modules=list(cfg.model.lora_targets)))
    model = FlareMTModel(flare, mt.model, mt.width, flare.hf_model.config.hidden_size)
    before = {n: p.detach().clone() for n, p in model.mt_encoder.named_parameters()}
    batcher = setup.batcher
    assert batcher.mt_tokenizer is mt.tokenizer
    examples = load_examples("demo", "dmb", "train")[:32]
    assert "mt_input_ids" in batcher(examples[:2])
    train_cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 8, "grad_accum": 1, "epochs": 1,
                                  "max_steps": 3, "warmup_ratio": 0.0, "gradient_checkpointing": False})
    train_model(model, batcher, examples, None, train_cfg, seed=0, device="cpu", desc="flare_mt")
    model.train()
    model(**batcher(examples[:8])).loss.backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.mt_encoder.parameters())
    for name, param in model.mt_encoder.named_parameters():
        assert torch.equal(param, before[name]), name


def test_4bit_stage2_flare_gives_every_lora_parameter_a_gradient(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = demo_cfg("tiny-llama", "flare", tmp_path, ["model.quantization=nf4"])
    setup, stage1 = fresh_stage1(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in stage1.modules())
    flare = get_flare_model(stage1, FlareConfig(target_modules="all-linear"))
    batcher = setup.batcher
    targets, english = load_examples("demo", "dmb", "train")[:32], load_examples("demo", "en", "train")[:32]
    train_cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 8, "grad_accum": 1, "epochs": 1,
                                  "max_steps": 2, "warmup_ratio": 0.0, "gradient_checkpointing": False})
    train_model(flare, batcher, targets, english, train_cfg, seed=0, device="cpu", desc="nf4 flare")
    flare.train()
    flare(**batcher(targets[:8], english[:8])).loss.backward()
    lora = [(n, p) for n, p in flare.named_parameters() if ".flare." in n]
    assert len(lora) == 2 * 7 * 2
    for name, param in lora:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["flare_mt", "xmixup"])
def test_gradient_checkpointing_runs_for_every_stage2_method(tmp_path, method, make_cfg, small):
    cfg = make_cfg(["model=tiny-llama", f"method={method}", "lang=dmb", *small, "++method.encoder=tiny",
                    "train.gradient_checkpointing=true", "stage1.gradient_checkpointing=true"], tmp_path)
    result = run(cfg)
    assert result["config"]["train"]["gradient_checkpointing"] is True
    assert result["stage2_train"]["steps"] >= 1 and result["metrics"]["n"] == 24


def test_every_method_config_has_its_class_and_only_the_methods_read_it(make_cfg):
    import re

    from flare_exp.methods import METHODS

    names = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert names == sorted(METHODS)
    for name in names:
        method = method_for(make_cfg([f"method={name}"]).method)
        assert method.name == name and method.label == name  # the defaults name no setting
    flare = method_for(make_cfg(["method=flare", "method.fusion=mul", "method.mask_source_padding=false"]).method)
    assert flare.label == "flare-mul-unmasked"
    for path in sorted((ROOT / "flare_exp").rglob("*.py")):
        if path.name != "methods.py":
            assert not re.findall(r"cfg\.method\.\w+|cfg\.method\.get", path.read_text()), path


@pytest.mark.parametrize("method", ["lora", "flare", "xmixup"])
def test_the_task_head_trains_in_stage2_where_the_model_config_says_so(tmp_path, method):
    for train_head in (True, False):
        cfg = demo_cfg("tiny-bert", method, tmp_path, [f"model.train_head={str(train_head).lower()}"])
        setup, stage1 = fresh_stage1(cfg)
        model = adapters.build(method_for(cfg.method), stage1, cfg.model, cfg.train, cfg.seed,
                               adapters.stage2_head(cfg.model, cfg.task))
        heads = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        assert bool(heads) == train_head, (method, train_head, heads)
        if train_head:
            batcher = setup.batcher
            english = load_examples("demo", "en", "train")[:8] if method != "lora" else None
            model.train()
            model(**batcher(load_examples("demo", "dmb", "train")[:8], english)).loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in model.named_parameters() if n in heads)
