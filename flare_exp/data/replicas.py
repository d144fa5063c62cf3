"""Local copies of the paper tables' hub datasets, laid out as the hub repositories are, for
``data.hub_mirror`` (``flare_exp.data.tasks.mirror_folder``): the hub loading code reads them as
it reads the hub.

* NusaX-senti (``indonlp/NusaX-senti``): a loading script alone on the main branch (refused by
  the pinned datasets) beside its parquet conversion on ``refs/convert/parquet``, one folder per
  config (``eng``, ``ace``, ...), a ClassLabel ``label``;
* XNLI (``facebook/xnli``): parquet on main, a config per language in the dataset card, a
  ClassLabel ``label``;
* TyDiQA-GoldP (``google-research-datasets/tydiqa``): the ``secondary_task`` config, every
  language in one file per split, told apart by the ids' prefix (``swahili--...``).

``write_replica(root, task, rows)`` writes one task's copy from ``rows[(lang, split)]``: lists
of the loader's own dicts (``{"id", <fields>, "label"}``; QA ``{"id", "context", "question",
"answers"}``), split named as the project names them (train, validation, test).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .tasks import mirror_folder


EXTRA_COLUMNS = {"indonlp/NusaX-senti": ("id", "lang")}  # beside the text fields and the label


def _parquet(path: Path, columns: dict, features) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def _card(folder: Path, configs: dict[str, dict[str, str]]) -> None:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def _hub_split(task: DictConfig, split: str) -> str:
    return (task.source.hub.get("splits") or {}).get(split, split)


def write_replica(root: str | Path, task: DictConfig, rows: dict[tuple[str, str], list[dict]]) -> Path:
    """A copy of ``task``'s hub dataset under ``root`` holding ``rows``; the copy's folder."""
    import datasets

    hub = task.source.hub
    if task.name == "tydiqa":
        return _tydiqa(root, task, rows)
    labels = datasets.ClassLabel(names=list(task.labels))
    extra = EXTRA_COLUMNS.get(hub.path, ())
    features = datasets.Features({**{c: datasets.Value("string") for c in extra},
                                  **{f: datasets.Value("string") for f in task.fields}, "label": labels})
    folder = mirror_folder(root, hub.path, hub.get("revision"))
    configs = {}
    for (lang, split), examples in rows.items():
        config = (hub.get("configs") or {}).get(lang) or hub.config.format(code=lang, name=lang)
        columns = {**{c: [str(i) if c == "id" else config for i in range(len(examples))] for c in extra},
                   **{f: [e[f] for e in examples] for f in task.fields},
                   "label": [list(task.labels).index(e["label"]) for e in examples]}
        hub_split = _hub_split(task, split)
        _parquet(folder / config / hub_split / "0000.parquet" if hub.get("data_dir")
                 else folder / config / f"{hub_split}-00000-of-00001.parquet", columns, features)
        configs.setdefault(config, {})[hub_split] = f"{config}/{hub_split}-*"
    if hub.get("revision"):  # NusaX: the main branch holds the loading script only
        main = mirror_folder(root, hub.path, None)
        main.mkdir(parents=True, exist_ok=True)
        (main / f"{hub.path.split('/')[-1]}.py").write_text("import datasets  # a loading script\n")
    else:
        _card(folder, configs)
    return folder


def _tydiqa(root, task: DictConfig, rows: dict[tuple[str, str], list[dict]]) -> Path:
    import datasets

    hub, names = task.source.hub, task.source.names
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")})})
    by_split: dict[str, list[dict]] = {}
    for (lang, split), examples in rows.items():
        prefix = hub.id_prefix.format(code=lang, name=names[lang])
        hub_split = _hub_split(task, split)
        known = {e["id"] for e in by_split.get(hub_split, [])}  # train and validation share a file
        by_split.setdefault(hub_split, []).extend(
            {**e, "id": e["id"] if e["id"].startswith(prefix) else f"{prefix}-{e['id']}"}
            for e in examples if e["id"] not in known and f"{prefix}-{e['id']}" not in known)
    folder = mirror_folder(root, hub.path, hub.get("revision"))
    for hub_split, examples in by_split.items():
        _parquet(folder / hub.config / f"{hub_split}-00000-of-00001.parquet",
                 {"id": [e["id"] for e in examples], "title": ["t"] * len(examples),
                  "context": [e["context"] for e in examples], "question": [e["question"] for e in examples],
                  "answers": [{"text": [a["text"] for a in e["answers"]],
                               "answer_start": [a["answer_start"] for a in e["answers"]]} for e in examples]},
                 features)
    _card(folder, {hub.config: {s: f"{hub.config}/{s}-*" for s in by_split}})
    return folder
