"""Data pairing: the target-language examples of a run and their English versions.

Gold (the human English of a parallel dataset, ``mt=gold``), translate-train (the English
training set translated into the target language) and translate-test (the target test set
translated into English), through the translation cache that every method and seed share.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .data import DataError, load_examples
from .translate import (FakeTranslator, NLLBTranslator, _read_cache, cache_file, nllb_code, project_qa,
                        translate_examples)


def examples(cfg: DictConfig, lang: str, split: str) -> list[dict]:
    rows = load_examples(cfg.task, lang, split, cfg.data.dir)
    cap = {"train": cfg.data.max_train, "test": cfg.data.max_test}.get(split, cfg.data.get("max_validation"))
    return rows[: int(cap)] if cap else rows


def paired(cfg: DictConfig, lang: str, split: str) -> tuple[list[dict], list[dict]]:
    """Target examples and their human English versions (parallel data, ``mt=gold``)."""
    target, english = examples(cfg, lang, split), examples(cfg, "en", split)
    _check_parallel(cfg, lang, split, target, english)
    return target, english


def _check_parallel(cfg: DictConfig, lang: str, split: str, target: list[dict], english: list[dict]) -> None:
    if len(target) != len(english):
        raise DataError(f"{cfg.task.name} {split} data in {lang} is not parallel to the English data "
                        f"({len(target)} examples against {len(english)}).")
    unlike = next((i for i, (t, e) in enumerate(zip(target, english)) if t.get("label") != e.get("label")), None)
    if unlike is not None:
        raise DataError(f"{cfg.task.name} {split} data in {lang} is not parallel to the English data "
                        f"(example {unlike + 1} has label {target[unlike]['label']!r}, its English "
                        f"{english[unlike]['label']!r}).")


def _texts(example: dict) -> list[str]:
    return [v for k, v in example.items() if k not in ("id", "label", "answers") and isinstance(v, str)]


def check_data(cfg: DictConfig, trains: bool) -> dict[str, int]:
    """Read every split the run will read, before any model loads. A missing, undecodable or
    malformed file, target data not parallel to the English (``mt=gold``) and a QA answer that is
    not at its offset in the context are refused (DataError, one sentence). Empty texts are
    counted and reported (refused with ``data.empty_texts=refuse``). Returns those counts."""
    lang, gold = cfg.lang.code, cfg.mt.name == "gold"
    validates = trains and cfg.train.get("eval_every") != 0
    reads = [("en", "train"), ("en", "test"), (lang, "test")]  # stage 1, its English test, the test
    if validates:
        reads.append(("en", "validation"))
    if gold:
        reads += [(lang, "train")] * trains + [(lang, "validation")] * validates
    data = {key: examples(cfg, *key) for key in dict.fromkeys(reads)}
    empty = {}
    for (code, split), rows in data.items():
        if gold and code == lang and code != "en":
            _check_parallel(cfg, lang, split, rows, data[("en", split)])
        where = f"{cfg.task.name} {code} {split}"
        misplaced = [ex["id"] for ex in rows for a in ex.get("answers", [])
                     if ex["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] != a["text"]]
        if misplaced:
            raise DataError(f"{where}: {len(misplaced)} answers are not found at their offset in the context "
                            f"(first: question {misplaced[0]}).")
        count = sum(not text.strip() for ex in rows for text in _texts(ex))
        if count:
            empty[f"{code} {split}"] = count
    if empty:
        listed = ", ".join(f"{n} in {where}" for where, n in empty.items())
        if cfg.data.get("empty_texts", "warn") == "refuse":
            raise DataError(f"{cfg.task.name} has empty texts ({listed}) and data.empty_texts=refuse.")
        print(f"warning: {cfg.task.name} has empty texts: {listed}.", flush=True)
    return empty


class LazyTranslator:
    """The configured MT system, loaded only when the cache lacks a translation. Its ``name``
    (the MT config's name, beams and length) names the translation caches."""

    def __init__(self, cfg: DictConfig, device):
        self.cfg, self.device, self._impl = cfg, device, None
        mt = cfg.mt
        self.max_length = cfg.task.get("mt_max_length") or mt.get("max_length")
        beams = mt.get("beams") or "default"
        self.name = mt.name if mt.name == "fake" else f"{mt.name}-beams{beams}-len{self.max_length}"

    def translate(self, texts, src, tgt):
        if self._impl is None:
            mt = self.cfg.mt
            self._impl = FakeTranslator(delay_s=mt.get("delay_s", 0.0)) if mt.name == "fake" else NLLBTranslator(
                mt.model, beams=mt.beams, max_length=self.max_length, batch_size=mt.batch_size, device=self.device)
        return self._impl.translate(texts, src, tgt)


def _cache(cfg: DictConfig, split: str, direction: str, translator) -> Path:
    return cache_file(Path(cfg.output_dir) / "translations", cfg.task.name, split, direction, cfg.lang.code,
                      translator.name)


def missing_translations(cfg: DictConfig, split: str, direction: str, translator) -> int:
    """How many examples of ``split`` the ``direction`` translation cache lacks (en-x: the English
    split into the target language; x-en: the target split into English)."""
    source = examples(cfg, "en" if direction == "en-x" else cfg.lang.code, split)
    done = _read_cache(_cache(cfg, split, direction, translator))
    return sum(ex["id"] not in done for ex in source)


def training_pairs(cfg: DictConfig, translator, split: str = "train") -> tuple[list[dict], list[dict], dict]:
    """Stage-2 training (or validation) data: target-language examples and their English versions.

    ``mt=gold``: the human target side of a parallel dataset. Otherwise translate-train: the
    English split translated into the target language (QA answers carried through the
    translation by markers; examples whose markers are lost or duplicated are dropped).
    """
    if cfg.mt.name == "gold":
        targets, english = paired(cfg, cfg.lang.code, split)
        return targets, english, {}
    english = examples(cfg, "en", split)
    src, tgt = "eng_Latn", nllb_code(cfg.lang)
    path = _cache(cfg, split, "en-x", translator)
    if cfg.task.type == "qa":
        targets, counts = project_qa(english, translator, src, tgt, path, cfg.mt.batch_size,
                                     desc=f"translate-{split} en->{cfg.lang.code}")
        by_id = {ex["id"]: ex for ex in english}
        return targets, [by_id[t["id"]] for t in targets], {"answer_projection": counts}
    fields = list(cfg.task.fields)
    translated = translate_examples(english, fields, src, tgt, translator, path, cfg.mt.batch_size,
                                    desc=f"translate-{split} en->{cfg.lang.code}")
    return [{**ex, **t} for ex, t in zip(english, translated)], english, {}


def test_pairs(cfg: DictConfig, translator, english: bool = True) -> tuple[list[dict], list[dict] | None]:
    """The target test set and its English version (human under ``mt=gold``, else
    translate-test), or None where ``english`` is not needed."""
    if cfg.mt.name == "gold":
        return paired(cfg, cfg.lang.code, "test")
    test = examples(cfg, cfg.lang.code, "test")
    if not english:
        return test, None
    translated = translate_examples(test, list(cfg.task.fields), nllb_code(cfg.lang), "eng_Latn", translator,
                                    _cache(cfg, "test", "x-en", translator), cfg.mt.batch_size,
                                    desc=f"translate-test {cfg.lang.code}->en")
    return test, [{**ex, **t} for ex, t in zip(test, translated)]


def back_translate_answers(cfg: DictConfig, rows: list[dict], translator, out: Path) -> None:
    """Translate-test QA answers are English spans: translate them into the target language,
    which the gold answers are in (the English answer stays in ``output``)."""
    answers = [{"id": r["id"], "answer": r["prediction"] or ""} for r in rows]
    translated = translate_examples(answers, ["answer"], "eng_Latn", nllb_code(cfg.lang), translator,
                                    out / "answers-en-x" / f"{translator.name}.jsonl", cfg.mt.batch_size,
                                    desc="translate answers back")
    for row, fields in zip(rows, translated):
        row["output"], row["prediction"] = row["prediction"], fields["answer"]
