"""FLARE on bitsandbytes 4-bit NF4 base weights, on CPU (tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flare_exp.flare import FlareConfig, get_flare_model, load_flare_model
from helpers import capture_input, inputs, load_4bit, weighted_loss
from tiny import randomize_lora, tiny_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def linear4bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_training_after_eval_pass_gives_gradients_to_every_lora_parameter(llama_dir):
    flare = get_flare_model(load_4bit(llama_dir, protect=False), FlareConfig(target_modules="all-linear"))
    # The in-place CPU repack of 4-bit weights (AVX512-BF16) is switched off on every layer.
    layers = linear4bit_layers(flare)
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    randomize_lora(flare.peft_model, seed=1, scale=0.2)
    target, source = inputs("llama")
    flare.eval()
    with torch.no_grad():
        flare(**target, **source)
    flare.train()
    weighted_loss(flare(**target, **source).logits).backward()
    lora = [(n, p) for n, p in flare.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 decoder layers
    for name, param in lora:
        assert param.requires_grad and param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_stage2_keeps_stage1_as_frozen_adapter(llama_dir, tmp_path):
    stage1 = get_peft_model(load_4bit(llama_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(stage1, seed=6, scale=0.1)
    target, source = inputs("llama")
    name = "model.layers.1.self_attn.q_proj"
    with torch.no_grad():
        expected = stage1(**target).logits
        with stage1.disable_adapter():
            assert not torch.allclose(expected, stage1(**target).logits, atol=1e-4)
    # The input the stage-1 model feeds a fused projection on the English source.
    x_s = capture_input(stage1.base_model.model, name, input_ids=source["source_input_ids"],
                        attention_mask=source["source_attention_mask"])

    flare = get_flare_model(stage1, FlareConfig(target_modules="all-linear"))
    assert linear4bit_layers(flare), "4-bit weights must stay 4-bit (no merge)"
    assert sorted(flare.peft_model.base_model.active_adapters) == ["flare", "stage1"]
    trainable = [n for n, p in flare.named_parameters() if p.requires_grad]
    assert trainable and all(".flare." in n for n in trainable)
    assert any(".stage1." in n for n, _ in flare.named_parameters())

    names = {id(m): n for n, m in flare.peft_model.named_modules()}
    call = flare.source_pass(source["source_input_ids"], source["source_attention_mask"])
    recorded = {names[key]: x for key, x in call.records.items()}
    with torch.no_grad():
        got = flare(**target, **source).logits
    # B = 0: stage 2 starts at the stage-1 model, and its source pass is the stage-1 model.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorded["base_model.model." + name], x_s, atol=1e-6, rtol=0)

    randomize_lora(flare.peft_model, seed=2, scale=0.2)  # also changes stage1: reload it below
    flare.save_pretrained(tmp_path)
    with torch.no_grad():
        before = flare(**target, **source).logits
    stage1_again = get_peft_model(load_4bit(llama_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    kept = {n.replace(".stage1.", ".default."): p for n, p in flare.peft_model.named_parameters() if ".stage1." in n}
    with torch.no_grad():
        for n, p in stage1_again.named_parameters():
            if "lora_" in n:
                p.copy_(kept.pop(n))
    assert not kept
    loaded = load_flare_model(stage1_again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**target, **source).logits, before, atol=0, rtol=0)
