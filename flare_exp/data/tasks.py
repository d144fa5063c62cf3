"""Task data: examples for (task, language, split), from the hub or a local data directory.

What a task's data is lives in its config (``conf/task/<name>.yaml``, key ``source``): the
format, the local file layout, the file split of each split, the dataset's name of each
language and the hub dataset. A new parallel classification task in the csv or tsv layout needs
a config file only. Every loader returns a list of ``{"id", <text fields>, "label"}`` dicts (QA:
``{"id", "context", "question", "answers": [{"text", "answer_start"}]}``). For parallel datasets
row i of every language is the same example, which is how a target example finds its English
version under ``mt=gold``.

Formats (``source.format``), local files at ``data.dir``/``source.path`` with ``{split}`` (the
file split from ``source.splits``), ``{code}`` (the language code) and ``{name}`` (its name in
``source.names``) filled in:
* ``csv``: a header ``id,<fields>,label``, one example a row (NusaX-senti);
* ``tsv``: ``<fields>...<TAB>label`` without header or quoting (XNLI);
* ``squad``: SQuAD v1.1 JSON (TyDiQA-GoldP);
* ``demo``: generated (``flare_exp/data/demo.py``).
Where train and validation map to the same file split (local XNLI has no English training set:
both come from dev; TyDiQA's validation comes from train), validation is its last 10% and train
the first 90%, or the whole file with ``source.holdout: false`` (TyDiQA, as the official code).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .demo import load_demo

SPLITS = ("train", "validation", "test")
CONF = Path(__file__).resolve().parent.parent.parent / "conf" / "task"


class DataError(ValueError):
    """A dataset that is missing or malformed."""


def task_config(name: str) -> DictConfig:
    path = CONF / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"No task {name!r}; choose one of {sorted(p.stem for p in CONF.glob('*.yaml'))}.")
    return OmegaConf.load(path)


def load_examples(task, lang: str, split: str, data_dir: str | Path | None = None,
                  hub_mirror: str | Path | None = None) -> list[dict]:
    """Examples of ``task`` (a task config, or a task's name) in ``lang`` for ``split``: from the
    local files under ``data_dir``, else from the hub dataset (or its copy under ``hub_mirror``)."""
    cfg = task_config(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    source = cfg.source
    if source.format == "demo":
        return load_demo(lang, split)
    names = source.get("names")
    if names is not None and lang not in names:
        raise ValueError(f"{cfg.name} has languages {sorted(names)}, not {lang!r}.")
    name = names[lang] if names is not None else lang
    # Which split of the local files (or of the hub dataset) each split comes from.
    splits = (source.get("splits") if data_dir else source.hub.get("splits")) or {}
    file_split = splits.get(split, split)
    if data_dir:
        path = Path(data_dir) / source.path.format(split=file_split, code=lang, name=name)
        rows = READERS[source.format](_need(path), cfg, split, file_split)
    else:
        rows = (_squad_hub if source.format == "squad" else _classification_hub)(cfg, lang, name, file_split,
                                                                                hub_mirror)
    if split != "test" and splits.get("train", "train") == splits.get("validation", "validation"):
        cut = len(rows) - len(rows) // 10
        if split == "validation":
            rows = rows[cut:]
        elif source.get("holdout", True):  # false: train keeps the whole file
            rows = rows[:cut]
    return rows


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"Missing data file {path}: point data.dir at a directory in the documented layout.")
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def _check_label(label: str, cfg: DictConfig, where: str) -> str:
    if label not in cfg.labels:
        raise DataError(f"{where}: unknown label {label!r} (expected one of {list(cfg.labels)}).")
    return label


def _csv(path: Path, cfg: DictConfig, split: str, file_split: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(_text(path), newline="")))
    header = ["id", *cfg.fields, "label"]
    if not rows or set(rows[0]) != set(header):
        raise DataError(f"{path} must have the header {','.join(header)}.")
    for number, row in enumerate(rows):
        if None in row or None in row.values():  # a cell too many, or too few
            raise DataError(f"{path}, row {number + 1}: expected the {len(header)} columns {','.join(header)}.")
    return [{"id": f"{cfg.name}-{split}-{r['id']}", **{f: r[f] for f in cfg.fields},
             "label": _check_label(r["label"], cfg, str(path))} for r in rows]


def _tsv(path: Path, cfg: DictConfig, split: str, file_split: str) -> list[dict]:
    rows = []
    for number, line in enumerate(_text(path).splitlines()):
        parts = line.split("\t")
        if len(parts) != len(cfg.fields) + 1 or parts[-1] not in cfg.labels:
            expected = "<TAB>".join([*cfg.fields, "label"])
            raise DataError(f"{path}, line {number + 1}: expected {expected} with a label of {list(cfg.labels)}.")
        rows.append({"id": f"{cfg.name}-{file_split}-{number}", **dict(zip(cfg.fields, parts)), "label": parts[-1]})
    return rows


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


def _squad(path: Path, cfg: DictConfig, split: str, file_split: str) -> list[dict]:
    try:
        return _squad_rows(json.loads(_text(path)), str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not SQuAD v1.1 JSON ({error}).") from error


READERS = {"csv": _csv, "tsv": _tsv, "squad": _squad}


def mirror_folder(mirror: str | Path, repo: str, revision: str | None) -> Path:
    """Where a copy of the hub dataset ``repo`` at ``revision`` lies under ``mirror``:
    ``<mirror>/<owner>/<name>/<revision, '/' written %2F>`` (``huggingface-cli download <repo>
    --repo-type dataset --revision <revision> --local-dir <that folder>`` fills it)."""
    return Path(mirror) / repo / (revision or "main").replace("/", "%2F")


def hub_split(hub: DictConfig, config: str, split: str, mirror: str | Path | None = None):
    """One split of a hub dataset (``source.hub``: ``path``; ``revision``, where the data is not on
    the main branch; ``data_dir`` where each config is a folder of that revision, else the
    config is named), from the hub or from its copy under ``mirror``.

    NusaX-senti's main branch holds only a loading script, which the pinned datasets refuses; the
    hub keeps its parquet conversion on the ``refs/convert/parquet`` revision, one folder per
    config (``ace/train/0000.parquet``), which loads as data files."""
    import datasets

    revision = hub.get("revision")
    where = {"data_dir": hub.data_dir.format(config=config)} if hub.get("data_dir") else {"name": config}
    download = f"huggingface-cli download {hub.path} --repo-type dataset" + (f" --revision {revision}" if revision else "")
    if mirror:
        folder = mirror_folder(mirror, hub.path, revision)
        if not folder.is_dir():
            raise DataError(f"No copy of the hub dataset {hub.path} (revision {revision or 'main'}) in {folder}: "
                            f"download it with `{download} --local-dir {folder}`.")
        return datasets.load_dataset(str(folder), split=split, cache_dir=_cache_of(folder), **where)
    if offline(datasets=True):  # the repository's files as `huggingface-cli download` left them in the hub cache
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = snapshot_download(hub.path, repo_type="dataset", revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            raise DataError(f"Offline, and the hub dataset {hub.path} is not in the hub cache: `{download}` where "
                            "the hub can be reached (the same HF_HOME), or point data.dir at a local copy.") from None
        return datasets.load_dataset(folder, split=split, cache_dir=_cache_of(Path(folder)), **where)
    return datasets.load_dataset(hub.path, split=split, revision=revision, **where)


def _cache_of(folder: Path) -> str:
    """The datasets cache of a local copy, its own for each state of its files: datasets names the
    cache of a local folder after the folder's name and the data files' patterns, so another copy
    (or the same copy downloaded again) would be served the arrow files of the first."""
    import hashlib

    from datasets import config

    files = sorted(p for p in Path(folder).resolve().rglob("*") if p.is_file() and ".cache" not in p.parts)
    state = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return str(Path(config.HF_DATASETS_CACHE) / "local-copies" / hashlib.sha256(state.encode()).hexdigest()[:16])


def offline(datasets: bool = False) -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``; ``datasets``:
    ``HF_DATASETS_OFFLINE`` too), read from the environment as it is now."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in names)


def _squad_hub(cfg: DictConfig, lang: str, name: str, split: str, mirror=None) -> list[dict]:
    hub = cfg.source.hub
    data = hub_split(hub, hub.config, split, mirror)
    prefix = hub.id_prefix.format(code=lang, name=name)
    return [
        {"id": r["id"], "context": r["context"], "question": r["question"],
         "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        for r in data if r["id"].startswith(prefix)
    ]


def _classification_hub(cfg: DictConfig, lang: str, name: str, split: str, mirror=None) -> list[dict]:
    hub = cfg.source.hub
    config = (hub.get("configs") or {}).get(lang) or hub.config.format(code=lang, name=name)
    data = hub_split(hub, config, split, mirror)
    names = getattr(data.features.get("label"), "names", None) or list(cfg.labels)
    rows = []
    for i, row in enumerate(data):
        label = row["label"]
        label = names[label] if isinstance(label, int) else label
        rows.append({"id": f"{cfg.name}-{split}-{row.get('id', i)}", **{f: row[f] for f in cfg.fields},
                     "label": label})
    return rows
