"""Data pairing: the target-language examples of a run and their English versions.

Gold (the human English of a parallel dataset, ``mt=gold``), translate-train (the English
training set translated into the target language) and translate-test (the target test set
translated into English), through the translation cache that every method and seed share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .data import DataError, load_examples
from .record import read_cache
from .translate import (QUOTE, FakeTranslator, NLLBTranslator, nllb_code, project_qa, project_qa_quotes,
                        translate_examples, translate_quoted)


class Examples:
    """The examples of one task, read once per (language, split) and capped as ``data.*`` says
    (``max_train``, ``max_validation``, ``max_test``)."""

    def __init__(self, task_cfg: DictConfig, data_cfg: DictConfig, strip_quotes: bool = False):
        self.task, self.data = task_cfg, data_cfg
        self.strip_quotes = strip_quotes  # protocol.qa_answer_projection: quotes (tasks/tydiqa.py)
        self._read: dict[tuple[str, str], list[dict]] = {}
        self._stripped: dict[tuple[str, str], list[dict]] = {}

    def raw(self, lang: str, split: str) -> list[dict]:
        """The examples as the data holds them."""
        key = (lang, split)
        if key not in self._read:
            rows = load_examples(self.task, lang, split, self.data.dir, self.data.get("hub_mirror"))
            cap = {"train": self.data.max_train, "test": self.data.max_test}.get(split, self.data.get("max_validation"))
            self._read[key] = rows[: int(cap)] if cap else rows
        return self._read[key]

    def __call__(self, lang: str, split: str) -> list[dict]:
        """The examples a run reads: as the data holds them, or with ``strip_quotes`` every quote
        mark removed from their contexts and questions and the answer starts not moved (the
        official code's load_data)."""
        if not self.strip_quotes:
            return self.raw(lang, split)
        key = (lang, split)
        if key not in self._stripped:
            self._stripped[key] = [{**ex, **{f: ex[f].replace(QUOTE, "") for f in ("context", "question") if f in ex}}
                                   for ex in self.raw(lang, split)]
        return self._stripped[key]

    def paired(self, lang: str, split: str) -> tuple[list[dict], list[dict]]:
        """Target examples and their human English versions (parallel data, ``mt=gold``)."""
        target, english = self(lang, split), self("en", split)
        self.check_parallel(lang, split, target, english)
        return target, english

    def check_parallel(self, lang: str, split: str, target: list[dict], english: list[dict]) -> None:
        where = f"{self.task.name} {split} data in {lang} is not parallel to the English data"
        if len(target) != len(english):
            raise DataError(f"{where} ({len(target)} examples against {len(english)}).")
        unlike = next((i for i, (t, e) in enumerate(zip(target, english)) if t.get("label") != e.get("label")), None)
        if unlike is not None:
            raise DataError(f"{where} (example {unlike + 1} has label {target[unlike]['label']!r}, its English "
                            f"{english[unlike]['label']!r}).")

    def check(self, reads: list[tuple[str, str]], lang: str, gold: bool, empty_texts: str = "warn") -> dict[str, int]:
        """Read the splits ``reads`` ((language, split)), before any model loads; they stay read. A
        missing, undecodable or malformed file, target data not parallel to the English
        (``gold``) and a QA answer that is not at its offset in the context are refused
        (DataError, one sentence). Empty texts are counted and reported (refused with
        ``empty_texts="refuse"``). Returns those counts."""
        data = {key: self.raw(*key) for key in dict.fromkeys(reads)}
        empty = {}
        for (code, split), rows in data.items():
            if gold and code == lang and code != "en":
                self.check_parallel(lang, split, rows, self.raw("en", split))
            where = f"{self.task.name} {code} {split}"
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
            if empty_texts == "refuse":
                raise DataError(f"{self.task.name} has empty texts ({listed}) and data.empty_texts=refuse.")
            print(f"warning: {self.task.name} has empty texts: {listed}.", flush=True)
        return empty


def _texts(example: dict) -> list[str]:
    return [v for k, v in example.items() if k not in ("id", "label", "answers") and isinstance(v, str)]


class LazyTranslator:
    """The configured MT system (``mt_cfg``), loaded only when a cache lacks a translation;
    ``name`` names its caches (``flare_exp.record.translator_name``)."""

    def __init__(self, mt_cfg: DictConfig, name: str, max_length: int, device, dtype: str = "auto"):
        self.mt, self.name, self.max_length, self.device, self._impl = mt_cfg, name, max_length, device, None
        self.dtype = dtype

    def translate(self, texts, src, tgt):
        if self._impl is None:
            mt = self.mt
            if mt.name == "fake":
                self._impl = FakeTranslator(tuple(mt.get("lose_markers_in", ())), mt.get("delay_s", 0.0))
            else:
                self._impl = NLLBTranslator(mt.model, beams=mt.beams, max_length=self.max_length,
                                            batch_size=mt.batch_size, device=self.device, dtype=self.dtype)
        return self._impl.translate(texts, src, tgt)


class Pairs:
    """The target-language examples of one (task, language) and their English versions: human
    where ``translator`` is None (``mt=gold``), else through ``translator`` and the caches
    ``cache(split, direction)`` (en-x: English into the language, x-en: into English)."""

    def __init__(self, examples: Examples, lang_cfg: DictConfig, translator=None,
                 cache: Callable[[str, str], Path] | None = None, quotes: bool = False):
        self.examples, self.task, self.lang = examples, examples.task, lang_cfg
        self.translator, self.cache = translator, cache
        self.quotes = quotes  # translate-train's QA answers marked as the official code marks them

    @property
    def fields(self) -> list[str]:
        return list(self.task.fields)

    def training(self, split: str = "train") -> tuple[list[dict], list[dict], dict]:
        """Stage-2 training (or validation) data: target-language examples, their English versions
        and what the translation dropped. Translate-train carries QA answers through the
        translation by markers; examples whose markers are lost or duplicated are dropped."""
        if self.translator is None:
            targets, english = self.examples.paired(self.lang.code, split)
            return targets, english, {}
        english = self.examples("en", split)
        src, tgt, path = "eng_Latn", nllb_code(self.lang), self.cache(split, "en-x")
        desc = f"translate-{split} en->{self.lang.code}"
        if self.task.type == "qa":
            project = project_qa_quotes if self.quotes else project_qa
            targets, counts = project(self.examples.raw("en", split) if self.quotes else english, self.translator,
                                      src, tgt, path, desc=desc)
            by_id = {ex["id"]: ex for ex in english}
            return targets, [by_id[t["id"]] for t in targets], {"answer_projection": counts}
        translated = translate_examples(english, self.fields, src, tgt, self.translator, path, desc=desc)
        return [{**ex, **t} for ex, t in zip(english, translated)], english, {}

    def test(self, english: bool = True) -> tuple[list[dict], list[dict] | None]:
        """The target test set and its English version (human under ``mt=gold``, else
        translate-test), or None where ``english`` is not needed."""
        if self.translator is None:
            return self.examples.paired(self.lang.code, "test")
        test = self.examples(self.lang.code, "test")
        if not english:
            return test, None
        translated = translate_examples(test, self.fields, nllb_code(self.lang), "eng_Latn", self.translator,
                                        self.cache("test", "x-en"), desc=f"translate-test {self.lang.code}->en")
        return test, [{**ex, **t} for ex, t in zip(test, translated)]

    def quoted_test(self, english_gold: bool, filtered: bool, drop_empty: bool) -> tuple[list[dict], list[dict], dict]:
        """The target test set and its English translation as the official code makes them
        (run_translate.py, tasks/tydiqa.py): each context's answer marked by quote marks
        (``quote_mark``), the translation read by them (``quote_locate``), quote marks stripped
        from the English contexts and questions. ``english_gold``: the English examples' answer is
        the one the marks found, else the target's. ``filtered`` (filter_qa_translations_multi in
        run.py): an item whose translation kept no mark is dropped, and with ``drop_empty`` (where
        the translation is also the target side: translate-test) one whose marked answer is
        empty. Returns the two lists and the counts."""
        test = self.examples(self.lang.code, "test")
        translated = translate_quoted(self.examples.raw(self.lang.code, "test"), self.translator, nllb_code(self.lang),
                                      "eng_Latn", self.cache("test", "x-en"),
                                      desc=f"translate-test {self.lang.code}->en (answers marked)")
        targets, english, counts = [], [], {"total": len(test), "lost": 0, "empty": 0}
        for ex, (found, question) in zip(test, translated):
            lost, empty = found["answer_start"] == -1, not found["answer"]
            counts["lost"] += lost
            counts["empty"] += empty and not lost
            if filtered and (lost or (drop_empty and empty)):
                continue
            answers = [{"text": found["answer"], "answer_start": found["answer_start"]}] if english_gold else ex["answers"]
            targets.append(ex)
            english.append({**ex, "context": found["context"], "question": question, "answers": answers})
        counts["kept"] = len(targets)
        return targets, english, counts

    def missing(self, split: str, direction: str) -> int:
        """How many examples of ``split`` the ``direction`` translation cache lacks."""
        source = self.examples("en" if direction == "en-x" else self.lang.code, split)
        done = read_cache(self.cache(split, direction))
        return sum(ex["id"] not in done for ex in source)

    def back_translate_answers(self, rows: list[dict], out: Path) -> None:
        """Translate-test QA answers are English spans: translate them into the target language,
        which the gold answers are in (the English answer stays in ``output``)."""
        answers = [{"id": r["id"], "answer": r["prediction"] or ""} for r in rows]
        translated = translate_examples(answers, ["answer"], "eng_Latn", nllb_code(self.lang), self.translator,
                                        out / "answers-en-x" / f"{self.translator.name}.jsonl",
                                        desc="translate answers back")
        for row, fields in zip(rows, translated):
            row["output"], row["prediction"] = row["prediction"], fields["answer"]
