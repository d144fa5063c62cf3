"""The FLARE core on tiny random models of several families (issue: FLARE core, points 1-8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from flare_exp.flare import FUSIONS, FlareConfig, MissingSourceError, get_flare_model, load_flare_model
from flare_exp.flare.layers import SourceCall
from helpers import (TARGETS, assert_same_grads, capture_input, checkpointed_grads, flare_config, inputs, lora_grads,
                     reference_index, weighted_loss)
from tiny import DECODERS, FAMILIES, PAD, randomize_lora, tiny_model

# The fused projection the reference tests look at: the value projection of the second layer.
FUSED_LAYER = {
    "llama": "model.layers.1.self_attn.v_proj",
    "xlmr": "roberta.encoder.layer.1.attention.self.value",
}
# inputs, flare_config, weighted_loss, lora_grads, capture_input: helpers.py (test_flare_calls.py
# and test_flare_4bit.py use them too)


def lora_config(family, **kwargs):
    return LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family], **kwargs)


def copy_lora_weights(peft_model, flare, source_adapter="default"):
    params = dict(flare.peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                params[name.replace(f".{source_adapter}.", ".flare.")].copy_(param)
                copied += 1
    assert copied > 0


# 1. fusion=none is PEFT LoRA -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_none_equals_peft_lora(family):
    base = tiny_model(family)
    lora = get_peft_model(copy.deepcopy(base), lora_config(family))
    flare = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="none"))
    randomize_lora(lora)
    copy_lora_weights(lora, flare)
    target, source = inputs(family)

    out_lora = lora(**target).logits
    out_flare = flare(**target, **source).logits
    torch.testing.assert_close(out_flare, out_lora, atol=1e-6, rtol=0)

    weighted_loss(out_lora).backward()
    weighted_loss(out_flare).backward()
    expected, got = lora_grads(lora, "default"), lora_grads(flare.peft_model, "flare")
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


# 2. At initialisation FLARE is the stage-1 model ----------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_initial_outputs_equal_stage1(family):
    stage1 = get_peft_model(tiny_model(family), lora_config(family))
    randomize_lora(stage1, seed=5, scale=0.1)
    target, source = inputs(family)
    with torch.no_grad():
        expected = stage1(**target).logits
        with stage1.disable_adapter():  # stage 1 really differs from the base model
            assert not torch.allclose(expected, stage1(**target).logits, atol=1e-4)
        flare = get_flare_model(stage1, flare_config(family))
        got = flare(**target, **source).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# 3. Every fusion against an independent reference ----------------------------------------------
def reference_phi(name, s, t, mask, causal, fusion_module):
    batch, length, r = t.shape
    if name == "none":
        return t
    if name == "add":
        return s + t
    if name == "add_relu":
        return s.clamp(min=0) + t.clamp(min=0)
    if name == "mul":
        return s * t
    out = torch.zeros_like(t)
    for b in range(batch):
        for i in range(length):
            visible = [j for j in range(length) if mask[b, j] and (j <= i or not causal)]
            if name in ("matmul", "matmul_relu"):
                si, tj = (s, t) if name == "matmul" else (s.clamp(min=0), t.clamp(min=0))
                gram = sum((torch.outer(tj[b, j], tj[b, j]) for j in visible), torch.zeros(r, r))
                out[b, i] = si[b, i] @ gram
            elif visible:  # cross_attention
                heads = fusion_module.heads
                d = r // heads
                q = s[b, i] @ fusion_module.q.weight.T
                k = t[b, visible] @ fusion_module.k.weight.T
                v = t[b, visible] @ fusion_module.v.weight.T
                for h in range(heads):
                    cols = slice(h * d, (h + 1) * d)
                    weights = torch.softmax(k[:, cols] @ q[cols] / math.sqrt(d), dim=0)
                    out[b, i, cols] = weights @ v[:, cols]
    return out


def fused_layer(flare, name):
    return dict(flare.peft_model.named_modules())["base_model.model." + name]


@pytest.mark.parametrize("family", ["llama", "xlmr"])
@pytest.mark.parametrize("fusion,alignment", [(f, "position") for f in FUSIONS]
                         + [("add_relu", "proportional"), ("cross_attention", "proportional")])
def test_fused_layer_matches_reference(family, fusion, alignment):
    base = tiny_model(family)
    flare = get_flare_model(copy.deepcopy(base), flare_config(family, fusion=fusion, heads=2, alignment=alignment))
    randomize_lora(flare.peft_model, seed=11, scale=0.3)
    target, source = inputs(family)
    name = FUSED_LAYER[family]
    # x_s: what the stage-1 model (here the base model itself) feeds this projection on English.
    x_s = capture_input(base, name, input_ids=source["source_input_ids"],
                        attention_mask=source["source_attention_mask"])

    layer = fused_layer(flare, name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    flare(**target, **source)
    handle.remove()
    x_t, y = seen["x"], seen["y"]

    A = layer.lora_A["flare"].weight
    B = layer.lora_B["flare"].weight
    W = layer.base_layer.weight
    bias = layer.base_layer.bias if layer.base_layer.bias is not None else 0
    causal = family in DECODERS
    index = reference_index(target["attention_mask"], source["source_attention_mask"],
                            alignment, "end" if causal else "start")
    s_full = x_s @ A.T
    s = torch.stack([
        torch.stack([s_full[b, j] if j >= 0 else torch.zeros(A.shape[0]) for j in index[b].tolist()])
        for b in range(index.shape[0])
    ])
    t = x_t @ A.T
    phi = reference_phi(fusion, s, t, target["attention_mask"], causal, layer.lora_fusion["flare"])
    expected = x_t @ W.T + bias + (16 / 8) * phi @ B.T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


def test_A_gets_gradient_through_source_and_target():
    family = "llama"
    base = tiny_model(family)
    flare = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="add_relu"))
    randomize_lora(flare.peft_model, seed=2, scale=0.3)
    target, source = inputs(family)
    name = FUSED_LAYER[family]
    layer = fused_layer(flare, name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    flare(**target, **source)
    handle.remove()
    A = layer.lora_A["flare"].weight
    B = layer.lora_B["flare"].weight
    upstream = torch.randn(seen["y"].shape, generator=torch.Generator().manual_seed(4))
    (grad_A,) = torch.autograd.grad((seen["y"] * upstream).sum(), A)

    x_s = capture_input(base, name, input_ids=source["source_input_ids"],
                        attention_mask=source["source_attention_mask"])
    x_t = seen["x"].detach()
    index = reference_index(target["attention_mask"], source["source_attention_mask"], "position", "end")
    valid = (index >= 0).unsqueeze(-1).float()
    gathered_x_s = x_s[torch.arange(3)[:, None], index.clamp(min=0)] * valid

    def path(through_source, through_target):
        a_s = A if through_source else A.detach()
        a_t = A if through_target else A.detach()
        phi = F.relu(gathered_x_s @ a_s.T) + F.relu(x_t @ a_t.T)
        return torch.autograd.grad((2.0 * phi @ B.T * upstream).sum(), A)[0]

    from_source, from_target = path(True, False), path(False, True)
    assert from_source.abs().sum() > 0 and from_target.abs().sum() > 0
    torch.testing.assert_close(grad_A, from_source + from_target, atol=1e-5, rtol=1e-4)


# 4. Gradient checkpointing, trainable parameters, no gradient into the source pass ------------
# (checkpointed_grads, assert_same_grads: helpers.py)
@pytest.mark.parametrize("family", ["llama", "gemma2", "bert", "t5"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_identical_under_gradient_checkpointing(family, reentrant, monkeypatch):
    base = tiny_model(family)
    recorded = []
    record = SourceCall.record
    monkeypatch.setattr(SourceCall, "record", lambda self, layer, x: (recorded.append(x), record(self, layer, x)))
    grads = []
    for checkpointing in (False, True):
        recorded.clear()
        grads.append(checkpointed_grads(base, family, [inputs(family)], checkpointing, reentrant))
        # Nothing flows into the source pass.
        assert recorded and all(not x.requires_grad and x.grad_fn is None for x in recorded)
    assert_same_grads(grads[0], grads[1])
    fused_A = [g for n, g in grads[1].items() if "lora_A" in n]
    assert all(g.abs().sum() > 0 for g in fused_A)


@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_only_adapter_parameters_are_trainable(fusion):
    flare = get_flare_model(tiny_model("llama"), flare_config("llama", fusion=fusion, heads=2))
    trainable = [n for n, p in flare.named_parameters() if p.requires_grad]
    assert trainable
    allowed = (".lora_A.flare.", ".lora_B.flare.") + ((".lora_fusion.flare.",) if fusion == "cross_attention" else ())
    assert all(any(tag in n for tag in allowed) for n in trainable), trainable
    if fusion == "cross_attention":
        assert any(".lora_fusion.flare." in n for n in trainable)


def test_masked_source_positions_contribute_nothing():
    """With every position masked (S = 0), add fusion is plain LoRA on the target."""
    family = "llama"
    base = tiny_model(family)
    add = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="add"))
    none = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="none"))
    randomize_lora(add.peft_model)
    randomize_lora(none.peft_model)
    target, source = inputs(family)
    no_source = torch.full_like(target["input_ids"], -1)
    with torch.no_grad():
        masked = add(**target, **source, source_index=no_source).logits
        plain = none(**target, **source).logits
        fused = add(**target, **source).logits
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(fused, plain, atol=1e-4)


# 6. Generation under D7 ------------------------------------------------------------------------
def manual_greedy(flare, family, target, source, steps):
    """Full forward passes, no cache: prompt positions fuse their aligned source positions,
    every generated position the last real source position (spec D7)."""
    source_mask = source["source_attention_mask"]
    if family == "t5":
        index = reference_index(target["attention_mask"], source_mask, "position", "start")
        decoder = torch.full((target["input_ids"].shape[0], 1), PAD)
        for _ in range(steps):
            logits = flare(input_ids=target["input_ids"], attention_mask=target["attention_mask"],
                           decoder_input_ids=decoder, source_index=index, **source).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return decoder
    prompt_index = reference_index(target["attention_mask"], source_mask, "position", "end")
    last = torch.tensor([max(i for i, v in enumerate(row) if v) for row in source_mask.tolist()])
    ids, mask = target["input_ids"], target["attention_mask"]
    for step in range(steps):
        index = torch.cat([prompt_index, last[:, None].expand(-1, step)], 1)
        logits = flare(input_ids=ids, attention_mask=mask, source_index=index, **source).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "t5"])
@pytest.mark.parametrize("fusion", ["add_relu", "matmul"])
def test_greedy_generation_equals_manual_decode(family, fusion):
    flare = get_flare_model(tiny_model(family), flare_config(family, fusion=fusion))
    randomize_lora(flare.peft_model, seed=9, scale=0.5)
    target, source = inputs(family)
    target.pop("decoder_input_ids", None)
    steps = 6
    with torch.no_grad():
        expected = manual_greedy(flare, family, target, source, steps)
        got = flare.generate(**target, **source, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=PAD, use_cache=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_with_fusion_none_equals_peft_lora(family):
    base = tiny_model(family)
    lora = get_peft_model(copy.deepcopy(base), lora_config(family))
    flare = get_flare_model(copy.deepcopy(base), flare_config(family, fusion="none"))
    randomize_lora(lora, scale=0.5)
    copy_lora_weights(lora, flare)
    target, source = inputs(family)
    target.pop("decoder_input_ids", None)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = lora.generate(**target, **settings)
        got = flare.generate(**target, **source, **settings)
    assert torch.equal(got, expected)


# Errors ----------------------------------------------------------------------------------------
def test_fused_layer_without_source_raises():
    flare = get_flare_model(tiny_model("llama"), flare_config("llama"))
    target, _ = inputs("llama")
    flare.train()
    with pytest.raises(ValueError, match="source_input_ids"):
        flare(**target)
    with pytest.raises(MissingSourceError, match="without source states"):
        flare.peft_model(**target)
    with torch.no_grad(), flare.peft_model.disable_adapter():
        flare.peft_model(**target)  # the adapter disabled: the stage-1 model, no error


def test_fuse_modules_must_be_lora_targets():
    with pytest.raises(ValueError, match="LoRA target"):
        get_flare_model(tiny_model("llama"), FlareConfig(target_modules=["k_proj", "q_proj"]))


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="Unknown fusion"):
        FlareConfig(fusion="concat")


def test_default_fused_modules_per_architecture():
    expected = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value"), "t5": ("q", "v")}
    for family, names in expected.items():
        flare = get_flare_model(tiny_model(family), flare_config(family))
        fused = [n for n, m in flare.named_modules() if len(getattr(m, "lora_fusion", {})) > 0]
        assert fused and all(n.rsplit(".", 1)[-1] in names for n in fused)
        assert flare.n_fused == len(fused) == 2 * 2  # two projections in each of two layers
        if family == "t5":
            assert all(".encoder." in n for n in fused)


# 8. Save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family,fusion", [("llama", "cross_attention"), ("bert", "add_relu"), ("t5", "mul")])
def test_save_load_round_trip(tmp_path, family, fusion):
    stage1 = get_peft_model(tiny_model(family), lora_config(family))
    randomize_lora(stage1, seed=4, scale=0.1)
    reloaded_stage1 = copy.deepcopy(stage1)
    flare = get_flare_model(stage1, flare_config(family, fusion=fusion, heads=2))
    randomize_lora(flare.peft_model, seed=8, scale=0.3)
    target, source = inputs(family)
    with torch.no_grad():
        expected = flare(**target, **source).logits
    flare.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "flare_config.json"]
    loaded = load_flare_model(reloaded_stage1, tmp_path)
    assert loaded.flare_config == flare.flare_config
    with torch.no_grad():
        got = loaded(**target, **source).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_official_fusion_layers_are_layer_pys():
    """official_fusion_layer (protocol.fusion_layer: default_unmasked), against layer.py read
    independently: FuseCrossAttention's biased query/key/value over every target position, dropout
    on its weights; fn_matmul's s @ t^T @ t over every position."""
    from flare_exp.flare.fusion import CrossAttentionFusion, Fusion, attention_dropout

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    fusion = CrossAttentionFusion(8, heads=2, official=True, dropout=0.0).eval()
    assert fusion.q.bias is not None and not torch.equal(fusion.q.weight, torch.eye(8))  # torch's default init

    def heads(x):
        return x.view(2, 5, 2, 4).permute(0, 2, 1, 3)

    q, k, v = heads(fusion.q(s)), heads(fusion.k(t)), heads(fusion.v(t))
    probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = (probs @ v).permute(0, 2, 1, 3).reshape(2, 5, 8)
    torch.testing.assert_close(fusion(s, t, mask, causal=True), expected)  # no padding, no causal mask
    ours = CrossAttentionFusion(8, heads=2)
    assert ours.q.bias is None and torch.equal(ours.q.weight, torch.eye(8))
    dropped = CrossAttentionFusion(8, heads=2, official=True, dropout=0.5)
    dropped.load_state_dict(fusion.state_dict())
    assert not torch.allclose(dropped.train()(s, t), expected)
    torch.testing.assert_close(dropped.eval()(s, t), expected)
    torch.testing.assert_close(Fusion("matmul", unmasked=True)(s, t, mask, causal=True), s @ t.transpose(1, 2) @ t)
    assert not torch.allclose(Fusion("matmul")(s, t, mask, causal=True), s @ t.transpose(1, 2) @ t)
    # the dropout is the model's attention dropout (run.py)
    base = tiny_model("xlmr")
    base.config.attention_probs_dropout_prob = 0.1  # XLM-R's published value (the tiny model has none)
    flare = get_flare_model(base, flare_config("xlmr", fusion="cross_attention", official_fusion_layer=True))
    layers = [m for m in flare.peft_model.modules() if isinstance(m, CrossAttentionFusion)]
    assert layers and all(m.dropout.p == attention_dropout(base.config) == 0.1 for m in layers)
