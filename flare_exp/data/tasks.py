"""Task data: examples for (task, language, split), from the hub or a local data directory.

Every loader returns a list of ``{"id", <text fields>, "label"}`` dicts. For parallel datasets
row i of every language is the same example, which is how a target example finds its English
version under ``mt=gold``.

Local formats (``data.dir=...``), as in the project's development data:
* ``nusax_senti/<language name>/{train,valid,test}.csv`` with header ``id,text,label``;
* ``xnli/{dev,test}-<lang>.tsv``: premise, hypothesis, label; no header, no quoting. XNLI ships
  no English training set locally, so the local ``train`` split is the dev set (parallel in all
  15 languages) and ``validation`` its last 10%.
* ``tydiqa_goldp/{train,dev}/tydiqa.goldp.<lang>.{train,dev}.json`` (SQuAD v1.1 JSON): the dev
  set is the test split; ``validation`` is the last 10% of train. QA examples are
  ``{"id", "context", "question", "answers": [{"text", "answer_start"}]}``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .demo import load_demo

NUSAX_NAMES = {
    "en": "english", "ace": "acehnese", "ban": "balinese", "bbc": "toba_batak", "bjn": "banjarese",
    "bug": "buginese", "ind": "indonesian", "jav": "javanese", "mad": "madurese",
    "min": "minangkabau", "nij": "ngaju", "sun": "sundanese",
}
NUSAX_LABELS = ("negative", "neutral", "positive")
XNLI_LABELS = ("entailment", "neutral", "contradiction")


class DataError(ValueError):
    """A dataset that is missing or malformed."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"Missing data file {path}: point data.dir at a directory in the documented layout.")
    return path


def _nusax_local(data_dir: Path, lang: str, split: str) -> list[dict]:
    name = {"validation": "valid"}.get(split, split)
    path = _need(data_dir / "nusax_senti" / NUSAX_NAMES[lang] / f"{name}.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or set(rows[0]) != {"id", "text", "label"}:
        raise DataError(f"{path} must have the header id,text,label.")
    for row in rows:
        if row["label"] not in NUSAX_LABELS:
            raise DataError(f"{path}: unknown label {row['label']!r} (expected one of {NUSAX_LABELS}).")
    return [{"id": f"nusax-{split}-{r['id']}", "text": r["text"], "label": r["label"]} for r in rows]


def _xnli_local(data_dir: Path, lang: str, split: str) -> list[dict]:
    file_split = "test" if split == "test" else "dev"
    path = _need(data_dir / "xnli" / f"{file_split}-{lang}.tsv")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if len(parts) != 3 or parts[2] not in XNLI_LABELS:
            raise DataError(f"{path}, line {number + 1}: expected premise<TAB>hypothesis<TAB>label.")
        rows.append({"id": f"xnli-{file_split}-{number}", "premise": parts[0], "hypothesis": parts[1],
                     "label": parts[2]})
    if split != "test":
        cut = len(rows) - len(rows) // 10
        rows = rows[:cut] if split == "train" else rows[cut:]
    return rows


TYDIQA_NAMES = {
    "en": "english", "ar": "arabic", "bn": "bengali", "fi": "finnish", "id": "indonesian",
    "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu",
}


def _squad_rows(data: dict, source: str) -> list[dict]:
    rows = []
    for article in data.get("data", []):
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa["answers"]]
                if not answers:
                    raise DataError(f"{source}: question {qa['id']} has no answer.")
                rows.append({"id": qa["id"], "context": context, "question": qa["question"], "answers": answers})
    if not rows:
        raise DataError(f"{source} holds no questions (expected SQuAD v1.1 JSON).")
    return rows


def _tydiqa_local(data_dir: Path, lang: str, split: str) -> list[dict]:
    import json

    file_split = "dev" if split == "test" else "train"
    path = _need(data_dir / "tydiqa_goldp" / file_split / f"tydiqa.goldp.{lang}.{file_split}.json")
    try:
        rows = _squad_rows(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not SQuAD v1.1 JSON ({error}).") from error
    if split != "test":
        cut = len(rows) - len(rows) // 10
        rows = rows[:cut] if split == "train" else rows[cut:]
    return rows


def _tydiqa_hub(lang: str, split: str) -> list[dict]:
    import datasets

    hub_split = "validation" if split == "test" else "train"
    data = datasets.load_dataset("google-research-datasets/tydiqa", "secondary_task", split=hub_split)
    prefix = TYDIQA_NAMES[lang] + "-"
    rows = [
        {"id": r["id"], "context": r["context"], "question": r["question"],
         "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        for r in data if r["id"].startswith(prefix)
    ]
    if split != "test":
        cut = len(rows) - len(rows) // 10
        rows = rows[:cut] if split == "train" else rows[cut:]
    return rows


def _hub(path: str, name: str, split: str, labels: tuple[str, ...], fields: list[str], prefix: str):
    import datasets

    data = datasets.load_dataset(path, name, split=split)
    names = getattr(data.features.get("label"), "names", None) or list(labels)
    rows = []
    for i, row in enumerate(data):
        label = row["label"]
        label = names[label] if isinstance(label, int) else label
        rows.append({"id": f"{prefix}-{split}-{row.get('id', i)}", **{f: row[f] for f in fields}, "label": label})
    return rows


def load_examples(task: str, lang: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Examples of ``task`` in ``lang`` for ``split`` (train, validation or test)."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"Unknown split {split!r}.")
    if task == "demo":
        return load_demo(lang, split)
    local = Path(data_dir) if data_dir else None
    if task == "nusax":
        if lang not in NUSAX_NAMES:
            raise ValueError(f"NusaX has languages {sorted(NUSAX_NAMES)}, not {lang!r}.")
        if local:
            return _nusax_local(local, lang, split)
        return _hub("indonlp/NusaX-senti", "eng" if lang == "en" else lang, split,
                    NUSAX_LABELS, ["text"], "nusax")
    if task == "xnli":
        if local:
            return _xnli_local(local, lang, split)
        return _hub("facebook/xnli", lang, split, XNLI_LABELS, ["premise", "hypothesis"], "xnli")
    if task == "tydiqa":
        if lang not in TYDIQA_NAMES:
            raise ValueError(f"TyDiQA-GoldP has languages {sorted(TYDIQA_NAMES)}, not {lang!r}.")
        return _tydiqa_local(local, lang, split) if local else _tydiqa_hub(lang, split)
    raise ValueError(f"No data loader for task {task!r}.")
