"""The FLARE core used as a library, the ways a new user would use it: per-call source state,
alignment owned by the model, every two-pass method under gradient checkpointing, LoRA options
the FLARE layers do not implement."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from flare_exp.flare import FlareConfig, MissingSourceError, build_source_index, get_flare_model
from flare_exp.flare.mt import FlareMTModel
from flare_exp.train import train_model
from flare_exp.xmixup import XMixupModel
from helpers import (assert_same_grads, checkpointed_grads, flare_config, inputs, load_4bit, reference_index,
                     weighted_loss)
from tiny import PAD, padded_batch, randomize_lora, tiny_model


def enable_checkpointing(model, reentrant):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


# 1. Per-call source state -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_two_forwards_before_one_backward_under_checkpointing(family, reentrant):
    base = tiny_model(family)
    batches = [inputs(family, seed=0), inputs(family, seed=1)]
    grads = [checkpointed_grads(base, family, batches, checkpointing, reentrant) for checkpointing in (False, True)]
    assert_same_grads(grads[0], grads[1])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_plain_call_after_a_checkpointed_training_step_raises(family):
    flare = get_flare_model(tiny_model(family), flare_config(family))
    randomize_lora(flare.peft_model, seed=3, scale=0.3)
    target, source = inputs(family)
    flare.train()
    flare.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weighted_loss(flare(**target, **source).logits).backward()
    with pytest.raises(MissingSourceError, match="without source states"):
        flare.hf_model(**target)  # training mode
    flare.eval()
    with torch.no_grad(), pytest.raises(MissingSourceError, match="without source states"):
        flare.hf_model(**target)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_state_is_restored_when_the_source_pass_raises(family):
    flare = get_flare_model(tiny_model(family), flare_config(family))
    randomize_lora(flare.peft_model, seed=3, scale=0.3)
    target, source = inputs(family)
    with torch.no_grad():
        expected = flare(**target, **source).logits
    flare.train()
    # The second layer fails during the source pass, as an out-of-memory error would.
    layers = [m for n, m in flare.hf_model.named_modules() if n.endswith("layers.1") or n.endswith("layer.1")]

    def fail(*_):
        raise RuntimeError("simulated out of memory")

    handle = layers[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        flare(**target, **source)
    handle.remove()
    assert flare.hf_model.training  # the source pass's eval mode is undone
    with pytest.raises(MissingSourceError, match="without source states"):
        flare.hf_model(**target)
    flare.eval()
    with torch.no_grad():
        torch.testing.assert_close(flare(**target, **source).logits, expected, atol=0, rtol=0)


# 2. The model owns alignment: the prompt of a causal LM is the -100 prefix of its labels --------
def answer_batch(answer_length=2):
    """Left-padded prompt + answer rows, labels on the last ``answer_length`` tokens."""
    target, source = inputs("llama")
    ids, mask = target["input_ids"], target["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, -answer_length:] = ids[:, -answer_length:]
    prompt_lengths = mask.sum(1) - answer_length
    return target, source, labels, prompt_lengths


@pytest.mark.parametrize("alignment", ["position", "proportional"])
def test_decoder_labels_mark_the_prompt(alignment):
    flare = get_flare_model(tiny_model("llama"), flare_config("llama", fusion="add", alignment=alignment))
    randomize_lora(flare.peft_model, seed=5, scale=0.3)
    target, source, labels, prompt_lengths = answer_batch()
    index = reference_index(target["attention_mask"], source["source_attention_mask"], alignment, "end",
                            prompt_lengths)
    whole = reference_index(target["attention_mask"], source["source_attention_mask"], alignment, "end")
    assert not torch.equal(index, whole)
    with torch.no_grad():
        got = flare(**target, **source, labels=labels).logits
        expected = flare(**target, **source, source_index=index).logits
        explicit = flare(**target, **source, labels=labels, target_prompt_lengths=prompt_lengths).logits
        as_prompt = flare(**target, **source, source_index=whole).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(explicit, expected, atol=0, rtol=0)
    assert not torch.allclose(got, as_prompt, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_labels_do_not_move_the_alignment_of_encoders(family):
    """Encoder labels are classes, encoder-decoder labels belong to the decoder: the fused
    encoder aligns its whole input either way."""
    flare = get_flare_model(tiny_model(family), flare_config(family, fusion="add"))
    randomize_lora(flare.peft_model, seed=5, scale=0.3)
    target, source = inputs(family)
    labels = torch.tensor([0, 2, 1]) if family == "bert" else padded_batch([3, 2, 3], "right", 9)[0]
    with torch.no_grad():
        with_labels = flare(**target, **source, labels=labels)
        without = flare(**target, **source)
    torch.testing.assert_close(with_labels.logits, without.logits, atol=0, rtol=0)
    assert with_labels.loss is not None


def test_a_non_default_anchor_reaches_training_batches():
    """A decoder batch carries masks and prompt lengths; the model's own anchor decides."""
    from flare_exp.data.collate import Batcher

    flare = get_flare_model(tiny_model("llama"), flare_config("llama", fusion="add", anchor="start"))
    randomize_lora(flare.peft_model, seed=5, scale=0.3)
    batcher = Batcher(_WordTokenizer(), _TASK, "decoder", max_length=32)
    target = [{"text": "a b c d e", "label": "positive"}, {"text": "f", "label": "negative"}]
    english = [{"text": "g h", "label": "positive"}, {"text": "i j k l m n", "label": "negative"}]
    batch = batcher(target, english)
    assert "source_index" not in batch
    lengths = batch["target_prompt_lengths"]
    answers = (batch["labels"] != -100).sum(1)
    assert torch.equal(lengths, batch["attention_mask"].sum(1) - answers)
    index = reference_index(batch["attention_mask"], batch["source_attention_mask"], "position", "start", lengths)
    with torch.no_grad():
        got = flare(**batch).logits
        expected = flare(**{k: v for k, v in batch.items() if k != "target_prompt_lengths"}, source_index=index).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_data_layer_does_not_import_the_core():
    code = ("import sys, flare_exp.data, flare_exp.data.collate, flare_exp.data.qa; "
            "print(sorted(m for m in sys.modules if m.startswith('flare_exp.flare')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _WordTokenizer:
    """A whitespace tokenizer with the few attributes the Batcher reads."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, PAD

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (sum(map(ord, w)) % 100) for w in text.split()]}

    def decode(self, ids):
        return " ".join("w" for _ in ids)


_TASK = OmegaConf.create({"type": "classification", "fields": ["text"], "labels": ["negative", "positive"],
                          "prompt": "{text} Sentiment:"})


# 3. mask_source_padding=false: both sides as if padded to one common width ------------------------
def common_width_reference(target_mask, source_mask, left):
    """Pad both masks to one width on their padding side and map position i to position i."""
    width = max(target_mask.shape[1], source_mask.shape[1])
    t_shift = width - target_mask.shape[1] if left else 0
    s_shift = width - source_mask.shape[1] if left else 0
    index = torch.full(target_mask.shape, -1, dtype=torch.long)
    for i in range(target_mask.shape[1]):
        j = i + t_shift - s_shift
        if 0 <= j < source_mask.shape[1]:
            index[:, i] = j
    return index


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_unmasked_alignment_pads_both_sides_to_one_width(family):
    left = family == "llama"
    side = "left" if left else "right"
    target_ids, target_mask = padded_batch([6, 9, 4], side, 0)
    source_ids, source_mask = padded_batch([5, 3, 2], side, 100)  # narrower than the target
    index = build_source_index(target_mask, source_mask, anchor="end" if left else "start",
                               mask_source_padding=False)
    expected = common_width_reference(target_mask, source_mask, left)
    assert torch.equal(index, expected)
    if left:  # the last target tokens meet the last source tokens, padding meets padding
        assert (index[:, -1] == source_mask.shape[1] - 1).all()
        assert index[2, 4] >= 0 and target_mask[2, 4] == 0 and source_mask[2, index[2, 4]] == 0

    flare = get_flare_model(tiny_model(family), flare_config(family, fusion="add", mask_source_padding=False))
    randomize_lora(flare.peft_model, seed=5, scale=0.3)
    target = dict(input_ids=target_ids, attention_mask=target_mask)
    source = dict(source_input_ids=source_ids, source_attention_mask=source_mask)
    with torch.no_grad():
        got = flare(**target, **source).logits
        reference = flare(**target, **source, source_index=expected).logits
    torch.testing.assert_close(got, reference, atol=0, rtol=0)


def test_unmasked_generation_prefills_with_the_common_width_map():
    flare = get_flare_model(tiny_model("llama"), flare_config("llama", fusion="add", mask_source_padding=False))
    randomize_lora(flare.peft_model, seed=9, scale=0.5)
    target, source = inputs("llama")
    source_mask = source["source_attention_mask"]
    prefill = common_width_reference(target["attention_mask"], source_mask, left=True)
    last = torch.tensor([max(i for i, v in enumerate(row) if v) for row in source_mask.tolist()])
    ids, mask, steps = target["input_ids"], target["attention_mask"], 4
    with torch.no_grad():
        for step in range(steps):
            index = torch.cat([prefill, last[:, None].expand(-1, step)], 1)
            logits = flare(input_ids=ids, attention_mask=mask, source_index=index, **source).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        got = flare.generate(**target, **source, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=PAD)
    assert torch.equal(got, ids)


# 4. Gradient checkpointing for every two-pass method -------------------------------------------
def _xmixup(base):
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="stage2")
    return XMixupModel(lora, "stage2", layers=[0, 1], lambda0=0.5)


def _flare_mt(base):
    flare = get_flare_model(base, flare_config("llama"))
    encoder = tiny_model("t5").get_encoder()
    return FlareMTModel(flare, encoder, 32, flare.hf_model.config.hidden_size)


def _mt_inputs(seed):
    ids, mask = padded_batch([5, 7, 3], "right", seed + 50)
    return dict(mt_input_ids=ids, mt_attention_mask=mask)


@pytest.mark.parametrize("method", ["xmixup", "flare_mt"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_every_method_under_checkpointing_two_forwards(method, reentrant):
    build = {"xmixup": _xmixup, "flare_mt": _flare_mt}[method]
    base = tiny_model("llama")
    batches = []
    for seed in (0, 1):
        target, source = inputs("llama", seed=seed)
        batches.append({**target, **(source if method == "xmixup" else _mt_inputs(seed))})
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build(copy.deepcopy(base))
        randomize_lora(model, seed=3, scale=0.3)
        model.train()
        if checkpointing:
            enable_checkpointing(model, reentrant)
            assert model.hf_model.is_activation_checkpointing
        loss = sum(weighted_loss(model(**b).logits, seed=7 + i) for i, b in enumerate(batches))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("lora_" in n for n in grads[0]) and any("lora_" not in n for n in grads[0])
    assert_same_grads(grads[0], grads[1])


@pytest.mark.parametrize("method", ["xmixup", "flare_mt", "flare"])
def test_train_model_with_gradient_checkpointing(method):
    build = {"xmixup": _xmixup, "flare_mt": _flare_mt,
             "flare": lambda base: get_flare_model(base, flare_config("llama"))}[method]
    model = build(tiny_model("llama"))
    target, source = inputs("llama")

    class Batches:  # one fixed batch, whatever the examples
        kind = "decoder"

        def __call__(self, examples, english=None, train=True):
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
            extra = _mt_inputs(0) if method == "flare_mt" else source
            return {**target, **extra, "labels": labels}

    train_cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 3, "grad_accum": 1, "epochs": 1,
                                  "max_steps": 4, "warmup_ratio": 0.0, "gradient_checkpointing": True})
    stats = train_model(model, Batches(), [{}] * 3, [{}] * 3, train_cfg, seed=0, device="cpu", desc=method)
    assert model.hf_model.is_activation_checkpointing
    assert stats["steps"] == 4 and stats["last_epoch_loss"] < stats["first_epoch_loss"]


# LoRA options the FLARE layers do not implement --------------------------------------------------
@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}])
def test_stage1_lora_options_flare_layers_cannot_run_are_refused(tmp_path, option):
    pytest.importorskip("bitsandbytes")
    tiny_model("llama").save_pretrained(tmp_path)
    base = load_4bit(tmp_path)
    stage1 = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **option))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"stage-1 adapter uses {name}"):
        get_flare_model(stage1, FlareConfig(target_modules="all-linear"))


def test_a_dora_stage1_on_full_precision_weights_is_merged_not_refused():
    stage1 = get_peft_model(tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            use_dora=True))
    randomize_lora(stage1, seed=5, scale=0.1)
    target, source = inputs("llama")
    with torch.no_grad():
        expected = stage1(**target).logits
        flare = get_flare_model(stage1, flare_config("llama"))
        torch.testing.assert_close(flare(**target, **source).logits, expected, atol=1e-5, rtol=1e-5)


def test_dropped_checkpointed_fusion_runs_no_source_pass_in_training(monkeypatch):
    """Where every fused layer runs checkpointed and drops its fusion, the source pass would be
    discarded: a training forward does not run it (the same logits as with it), evaluation does."""
    base = tiny_model("llama")
    target, source = inputs("llama")
    flare = get_flare_model(base, flare_config("llama", checkpointed_fusion=False))
    randomize_lora(flare.peft_model, seed=3, scale=0.3)
    flare.train()
    enable_checkpointing(flare.hf_model, False)
    with torch.no_grad():
        expected = flare(**target, **source).logits
    runs = []
    original = type(flare).source_pass
    monkeypatch.setattr(type(flare), "source_pass", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    with torch.no_grad():
        torch.testing.assert_close(flare(**target, **source).logits, expected, atol=0, rtol=0)
        assert runs == []
        flare.eval()
        flare(**target, **source)
        assert runs == [1]
    kept = get_flare_model(tiny_model("llama"), flare_config("llama"))
    kept.train()
    enable_checkpointing(kept.hf_model, False)
    monkeypatch.setattr(type(kept), "source_pass", lambda self, *a, **k: runs.append(2) or original(self, *a, **k))
    with torch.no_grad():
        kept(**target, **source)
    assert runs == [1, 2]  # fusion kept under checkpointing: the source pass runs


@pytest.mark.parametrize("reentrant", [False, True])
def test_dropped_checkpointed_fusion_trains_plain_lora_and_fuses_at_evaluation(reentrant):
    """checkpointed_fusion=False (protocol.checkpointed_fusion: dropped): under gradient
    checkpointing a training forward is the same adapter's plain LoRA, lora_B(lora_A(x)) with no
    source (the public code's LinearFuse without x_source); evaluation fuses as ever."""
    base = tiny_model("llama")
    target, source = inputs("llama")

    def built(**kwargs):
        flare = get_flare_model(copy.deepcopy(base), flare_config("llama", **kwargs))
        randomize_lora(flare.peft_model, seed=3, scale=0.3)  # the same weights in each
        return flare

    dropped, kept, plain = built(checkpointed_fusion=False), built(), built(fusion="none")
    for model in (dropped, kept, plain):
        model.train()
        enable_checkpointing(model.hf_model, reentrant)
        model.hf_model.enable_input_require_grads()
    outputs = {}
    for name, model in (("dropped", dropped), ("kept", kept), ("plain", plain)):
        logits = model(**target, **source).logits
        weighted_loss(logits).backward()
        outputs[name] = logits.detach()
    torch.testing.assert_close(outputs["dropped"], outputs["plain"], atol=1e-6, rtol=0)
    assert not torch.allclose(outputs["kept"], outputs["plain"], atol=1e-4)
    grads = [{n: p.grad for n, p in m.peft_model.named_parameters() if "lora_" in n and p.grad is not None}
             for m in (dropped, plain)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert_same_grads(grads[0], grads[1])
    with torch.no_grad():  # evaluation: no checkpointing, the fusion is back
        dropped.eval(), kept.eval()
        torch.testing.assert_close(dropped(**target, **source).logits, kept(**target, **source).logits, atol=1e-6, rtol=0)
