"""The rehearsal of a paper table (flare_exp.rehearse) and its stand-ins: tokenizers with the real
vocabulary sizes and special ids, models with the published architecture, jobs that pass and a
job that fails reported in one line with exit status 1."""

from __future__ import annotations

import pytest

from flare_exp import stand_ins


@pytest.mark.parametrize("name", sorted(stand_ins.TOKENIZERS))
def test_a_stand_in_tokenizer_has_the_real_vocabulary_and_special_ids(name, tmp_path):
    from transformers import AutoTokenizer

    spec = stand_ins.TOKENIZERS[name]
    tokenizer = AutoTokenizer.from_pretrained(stand_ins.tokenizer_folder(name, tmp_path))
    assert len(tokenizer) == spec["vocab"]
    for role, (token_id, text) in spec["specials"].items():
        assert getattr(tokenizer, f"{role}_token_id") == token_id and tokenizer.convert_ids_to_tokens(token_id) == text
    text = "Habari ya leo — Привет мир 你好 مرحبا"
    ids = tokenizer(text)["input_ids"]
    template = spec["template"].split()
    assert (ids[0] == spec["specials"]["bos"][0]) if "bos" in template else ids[0] not in tokenizer.all_special_ids
    assert ids[-1] == spec["specials"]["eos"][0] if "eos" in template else ids[-1] not in tokenizer.all_special_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) >= len(text.encode())  # a token per byte: a real tokenizer's limit is hit sooner


def test_xlmr_reads_its_real_sentencepiece_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stand_ins.tokenizer_folder("xlmr-large", tmp_path))
    assert len(tokenizer) == 250002 and (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.tokenize("Habari ya leo") == ["▁Habari", "▁ya", "▁leo"]


@pytest.mark.parametrize("name", sorted(stand_ins.PUBLISHED))
def test_a_stand_in_model_keeps_the_published_architecture(name, tmp_path):
    from transformers import AutoConfig

    folder = stand_ins.model_folder(name, tmp_path)
    config = AutoConfig.from_pretrained(folder)
    published = {k: v for k, v in stand_ins.PUBLISHED[name].items() if k not in stand_ins.SHRUNK[name]}
    assert config.model_type == published.pop("model_type")
    rope = {k: published.pop(k) for k in ("rope_theta", "rope_scaling") if k in published}
    tied = published.pop("tie_word_embeddings", None)
    assert {k: getattr(config, k) for k in published} == published
    if rope:  # transformers 5 keeps them in rope_parameters
        assert config.rope_parameters["rope_theta"] == rope["rope_theta"]
        assert rope.get("rope_scaling", {}).items() <= config.rope_parameters.items()
    if name == "gemma2-9b":  # the one sliding-window layer and the one global layer
        assert sorted(config.layer_types) == ["full_attention", "sliding_attention"]
    if tied is not None:  # as loaded (transformers 5 marks every mT5 config tied, and unties on loading)
        model = stand_ins._model_class(config).from_pretrained(folder)
        shares = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert shares == tied


def test_the_nllb_stand_in_knows_every_nllb_200_code(tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    tokenizer = AutoTokenizer.from_pretrained(stand_ins.nllb_folder(tmp_path, "abc"))
    ids = tokenizer.convert_tokens_to_ids(FAIRSEQ_LANGUAGE_CODES)
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == len(FAIRSEQ_LANGUAGE_CODES)
    tokenizer.src_lang = "swh_Latn"
    assert tokenizer("abc")["input_ids"][0] == tokenizer.convert_tokens_to_ids("swh_Latn")


def test_an_unknown_language_code_is_refused_not_read_as_unk(tmp_path):
    from flare_exp.translate import NLLBTranslator

    translator = NLLBTranslator(str(stand_ins.nllb_folder(tmp_path, "abc")), max_length=8)
    with pytest.raises(ValueError, match="no language code xyz_Latn"):
        translator.translate(["abc"], "eng_Latn", "xyz_Latn")


def _slice(models: str, methods: str, lang: str) -> list[str]:
    return [f"hydra.sweeper.params.model='{models}'", f"hydra.sweeper.params.method='{methods}'",
            f"hydra.sweeper.params.lang='{lang}'"]


@pytest.mark.slow
def test_a_slice_of_a_table_rehearses_every_stage(tmp_path):
    from flare_exp.rehearse import rehearse

    outcomes = rehearse("paper_tydiqa", _slice("xlmr-large,llama3.1-8b", "flare,translate_test", "sw"),
                        tmp_path / "work", stand_ins_root=tmp_path / "stand-ins")
    assert [(o.stage, o.model, o.method, o.lang) for o in outcomes] == [
        ("translate", "xlmr-large", "translate_test", "sw"),
        ("stage1", "xlmr-large", "lora", "sw"), ("stage1", "llama3.1-8b", "lora", "sw"),
        ("stage2", "xlmr-large", "flare", "sw"), ("stage2", "xlmr-large", "translate_test", "sw"),
        ("stage2", "llama3.1-8b", "flare", "sw"), ("stage2", "llama3.1-8b", "translate_test", "sw")]
    assert [o.result for o in outcomes] == ["ok"] * 7
    assert (tmp_path / "work" / "rehearsal.csv").read_text().count("\n") == 8


def test_a_failing_job_is_one_line_and_exit_status_1(tmp_path, capsys):
    from flare_exp.rehearse import main

    status = main(["experiment=paper_nusax", *_slice("xlmr-large", "zero_shot", "jav"), "train.lr=-1",
                   "--work", str(tmp_path / "work")])
    assert status == 1
    table = capsys.readouterr().out
    assert "| stage1 | xlmr-large | lora | jav | ConfigError: train.lr" in table
    assert "| stage2 | xlmr-large | zero_shot | jav | not run: stage 1 of xlmr-large failed |" in table
