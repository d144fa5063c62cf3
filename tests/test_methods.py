"""Every method of the paper on every model kind: input fusion, FLARE MT, X-Mixup, 4-bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import get_peft_model

from flare_exp.data import load_examples
from flare_exp.data.collate import SEPARATOR, concatenate_inputs
from flare_exp.flare import FlareConfig, get_flare_model
from flare_exp.flare.mt import FlareMTModel, load_mt_encoder
from flare_exp.models import load_base_model, load_tokenizer
from flare_exp.methods import lora_config as _lora_config
from flare_exp.pipeline import make_batcher, run
from flare_exp.train import train_model
from flare_exp.translate import build_tiny_nllb
from flare_exp.xmixup import XMixupModel
from test_pipeline import SMALL, make_cfg, run_path
from test_translate_qa import qa_data  # noqa: F401  (fixture)

METHODS = ["zero_shot", "translate_test", "lora", "input_fusion", "xmixup", "flare_mt", "flare"]
TASK_ARGS = {
    "demo": ["task=demo", "lang=dmb", "mt=gold"],
    "tydiqa": ["task=tydiqa", "lang=sw", "mt=fake", "task.max_length=64", "task.stride=16", "task.max_new_tokens=6"],
}


# Golden values: every method's training losses and test metrics on each tiny model (fixed seed,
# a few steps), so that a change that moves a number fails loudly. Re-record them, after a change
# that is meant to move them, with FLARE_RECORD_GOLDEN=1 pytest tests/test_methods.py -k end_to_end
# and say why in the commit.
GOLDEN_FILE = Path(__file__).parent / "golden_methods.json"


def _check_golden(key: str, observed: dict) -> None:
    golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {}
    if os.environ.get("FLARE_RECORD_GOLDEN"):
        golden[key] = observed
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    expected = golden[key]
    assert expected.keys() == observed.keys(), key
    for name, value in expected.items():
        if name == "metrics":  # a near tie may flip one prediction on another CPU
            for metric, score in value.items():
                assert observed[name][metric] == pytest.approx(score, abs=1.01 / observed[name]["n"]), (key, metric)
        else:  # training losses
            assert observed[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, name)


@pytest.mark.parametrize("task", ["demo", "tydiqa"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-t5"])
def test_every_method_end_to_end(tmp_path, qa_data, model, task):  # noqa: F811
    common = [f"model={model}", *TASK_ARGS[task], f"data.dir={qa_data}", "++method.encoder=tiny",
              *[o for o in SMALL if not o.startswith(("task=", "mt="))]]
    metric = "exact_match" if task == "tydiqa" else "accuracy"
    for method in METHODS:
        result = run(make_cfg([*common, f"method={method}"], tmp_path))
        metrics = result["metrics"]
        assert result["method"] == method
        assert metrics["n"] == (12 if task == "tydiqa" else 24)
        assert 0 <= metrics[metric] <= 1
        path = run_path(tmp_path, f"runs/{task}/{model}/{result['mt']}/{method}/{result['lang']}/seed100")
        assert (path / "results.json").is_file()
        stage2 = result["stage2_train"]
        if method not in ("zero_shot", "translate_test"):
            assert stage2["steps"] >= 1
        losses = [result["stage1"]["train"][k] for k in ("first_epoch_loss", "last_epoch_loss")]
        if stage2 is not None:
            losses += [stage2[k] for k in ("first_epoch_loss", "last_epoch_loss")]
        scores = {k: v for k, v in metrics.items() if k not in ("invalid",)}
        _check_golden(f"{task}/{model}/{method}", {"losses": losses, "metrics": scores})


def _demo_cfg(model, method, tmp_path, extra=()):
    return make_cfg([f"model={model}", f"method={method}", "task=demo", "lang=dmb", "mt=gold", *extra], tmp_path)


def test_input_fusion_feeds_both_texts(tmp_path):
    cfg = _demo_cfg("tiny-bert", "input_fusion", tmp_path)
    tokenizer = load_tokenizer(cfg.model, tmp_path)
    batcher = make_batcher(cfg, tokenizer)
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


def _stage1(cfg, tmp_path):
    tokenizer = load_tokenizer(cfg.model, tmp_path)
    base = load_base_model(cfg.model, tokenizer, list(cfg.task.labels), torch.device("cpu"), tmp_path, cfg.seed)
    return tokenizer, get_peft_model(base, _lora_config(cfg.model, cfg.stage1))


def test_xmixup_ratio_stays_below_lambda0_and_trains(tmp_path):
    cfg = _demo_cfg("tiny-llama", "xmixup", tmp_path)
    tokenizer, stage1 = _stage1(cfg, tmp_path)
    model = XMixupModel(get_peft_model(stage1.merge_and_unload(), _lora_config(cfg.model, cfg.train), adapter_name="stage2"),
                        "stage2", layers=[0, 1], lambda0=0.5)
    batcher = make_batcher(cfg, tokenizer)
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
    cfg = _demo_cfg("tiny-llama", "xmixup", tmp_path)
    tokenizer, stage1 = _stage1(cfg, tmp_path)
    model = XMixupModel(get_peft_model(stage1.merge_and_unload(), _lora_config(cfg.model, cfg.train), adapter_name="stage2"),
                        "stage2", layers=[0], lambda0=0.5)
    batch = make_batcher(cfg, tokenizer)(load_examples("demo", "dmb", "train")[:4], load_examples("demo", "en", "train")[:4])
    hf = model.hf_model
    runs = {"layer 0": 0, "layer 1": 0, "head": 0}
    for name, module in (("layer 0", hf.model.layers[0]), ("layer 1", hf.model.layers[1]), ("head", hf.lm_head)):
        module.register_forward_pre_hook(lambda *_, name=name: runs.__setitem__(name, runs[name] + 1))
    model(**batch)
    assert runs == {"layer 0": 2, "layer 1": 1, "head": 1}


def test_flare_mt_trains_the_projection_and_keeps_the_mt_encoder_frozen(tmp_path):
    cfg = _demo_cfg("tiny-bert", "flare_mt", tmp_path, ["++method.encoder=tiny"])
    tokenizer, stage1 = _stage1(cfg, tmp_path)
    encoder, mt_tokenizer, width = load_mt_encoder(str(build_tiny_nllb(tmp_path / "nllb")), "cpu")
    flare = get_flare_model(stage1, FlareConfig(target_modules=list(cfg.model.lora_targets)))
    model = FlareMTModel(flare, encoder, width, flare.hf_model.config.hidden_size)
    before = {n: p.detach().clone() for n, p in model.mt_encoder.named_parameters()}
    batcher = make_batcher(cfg, tokenizer, mt_tokenizer=mt_tokenizer)
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
    cfg = _demo_cfg("tiny-llama", "flare", tmp_path, ["model.quantization=nf4"])
    tokenizer, stage1 = _stage1(cfg, tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in stage1.modules())
    flare = get_flare_model(stage1, FlareConfig(target_modules="all-linear"))
    batcher = make_batcher(cfg, tokenizer)
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
def test_gradient_checkpointing_runs_for_every_stage2_method(tmp_path, method):
    cfg = make_cfg(["model=tiny-llama", f"method={method}", "lang=dmb", *SMALL, "++method.encoder=tiny",
                    "train.gradient_checkpointing=true", "stage1.gradient_checkpointing=true"], tmp_path)
    result = run(cfg)
    assert result["config"]["train"]["gradient_checkpointing"] is True
    assert result["stage2_train"]["steps"] >= 1 and result["metrics"]["n"] == 24


def test_every_method_config_has_its_class_and_only_the_methods_read_it():
    import re

    from flare_exp.methods import METHODS, method_for
    from test_pipeline import CONF, ROOT

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
    from flare_exp.methods import method_for

    for train_head in (True, False):
        cfg = _demo_cfg("tiny-bert", method, tmp_path, [f"model.train_head={str(train_head).lower()}"])
        tokenizer, stage1 = _stage1(cfg, tmp_path)
        model = method_for(cfg.method).build(cfg, stage1)
        heads = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        assert bool(heads) == train_head, (method, train_head, heads)
        if train_head:
            batcher = make_batcher(cfg, tokenizer)
            english = load_examples("demo", "en", "train")[:8] if method != "lora" else None
            model.train()
            model(**batcher(load_examples("demo", "dmb", "train")[:8], english)).loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in model.named_parameters() if n in heads)
