"""The three paper tables' datasets load through the hub loading code, from local copies laid out
as the hub repositories are: XNLI (parquet, a config per language), TyDiQA-GoldP (parquet
configs, languages told apart by their ids) and NusaX-senti (a loading script alone on the main
branch, which the pinned datasets refuses, beside its parquet conversion on refs/convert/parquet)."""

from __future__ import annotations

import pytest

from flare_exp.data import DataError, load_examples
from flare_exp.data.tasks import mirror_folder, task_config

NUSAX_LABELS = ["negative", "neutral", "positive"]
XNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _parquet(path, rows: dict, features=None):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def _card(folder, configs: dict[str, dict[str, str]]):
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hub")
    # NusaX-senti: the script on main, the data on the parquet revision only.
    main = mirror_folder(root, "indonlp/NusaX-senti", None)
    main.mkdir(parents=True)
    (main / "NusaX-senti.py").write_text("import datasets  # a loading script: refused by datasets 5\n")
    parquet = mirror_folder(root, "indonlp/NusaX-senti", "refs/convert/parquet")
    nusax = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                               "lang": datasets.Value("string"), "label": datasets.ClassLabel(names=NUSAX_LABELS)})
    for config in ("eng", "jav"):
        for split, n in (("train", 5), ("validation", 3), ("test", 4)):
            _parquet(parquet / config / split / "0000.parquet",
                     {"id": [str(i) for i in range(n)], "text": [f"{config} {split} {i}" for i in range(n)],
                      "lang": [config] * n, "label": [i % 3 for i in range(n)]}, nusax)
    # XNLI: parquet on main, a config per language in the card.
    xnli = mirror_folder(root, "facebook/xnli", None)
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=XNLI_LABELS)})
    for code in ("en", "sw"):
        for split, n in (("train", 6), ("validation", 3), ("test", 3)):
            _parquet(xnli / code / f"{split}-00000-of-00001.parquet",
                     {"premise": [f"{code} p{i}" for i in range(n)], "hypothesis": [f"{code} h{i}" for i in range(n)],
                      "label": [(i + 1) % 3 for i in range(n)]}, features)
    _card(xnli, {code: {s: f"{code}/{s}-*" for s in ("train", "validation", "test")} for code in ("en", "sw")})
    # TyDiQA: the GoldP task is the secondary_task config, every language in one file.
    tydiqa = mirror_folder(root, "google-research-datasets/tydiqa", None)
    qa = datasets.Features({"id": datasets.Value("string"), "title": datasets.Value("string"),
                            "context": datasets.Value("string"), "question": datasets.Value("string"),
                            "answers": datasets.Sequence({"text": datasets.Value("string"),
                                                          "answer_start": datasets.Value("int32")})})
    for split in ("train", "validation"):
        ids = [f"{name}--{split}{i}-0" for name in ("english", "swahili") for i in range(3)]
        _parquet(tydiqa / "secondary_task" / f"{split}-00000-of-00001.parquet",
                 {"id": ids, "title": ["t"] * 6, "context": [f"In {i} it rained." for i in ids],
                  "question": ["When?"] * 6,
                  "answers": [{"text": [i], "answer_start": [3]} for i in ids]}, qa)
    _card(tydiqa, {c: {s: f"{c}/{s}-*" for s in ("train", "validation")} for c in ("secondary_task",)})
    return root


def test_nusax_loads_from_its_parquet_conversion(mirror):
    task = task_config("nusax")
    test = load_examples(task, "jav", "test", hub_mirror=mirror)
    assert [r["text"] for r in test] == [f"jav test {i}" for i in range(4)]
    assert [r["label"] for r in test] == [NUSAX_LABELS[i % 3] for i in range(4)]  # the ClassLabel's names
    assert [r["id"] for r in test] == [f"nusax-test-{i}" for i in range(4)]
    english = load_examples(task, "en", "validation", hub_mirror=mirror)  # English is the config "eng"
    assert [r["text"] for r in english] == [f"eng validation {i}" for i in range(3)]


def test_the_script_on_nusax_main_branch_is_not_what_loads(mirror):
    import datasets

    with pytest.raises(Exception):  # data files alone: main holds none
        datasets.load_dataset(str(mirror_folder(mirror, "indonlp/NusaX-senti", None)), "jav", split="test")


def test_xnli_loads_each_language_config_with_its_labels(mirror):
    rows = load_examples(task_config("xnli"), "sw", "test", hub_mirror=mirror)
    assert [(r["premise"], r["hypothesis"], r["label"]) for r in rows] == [
        (f"sw p{i}", f"sw h{i}", XNLI_LABELS[(i + 1) % 3]) for i in range(3)]


def test_tydiqa_loads_the_goldp_config_and_keeps_one_language(mirror):
    task = task_config("tydiqa")
    test = load_examples(task, "sw", "test", hub_mirror=mirror)  # test: the hub's validation split
    assert [r["id"] for r in test] == [f"swahili--validation{i}-0" for i in range(3)]
    assert all(r["context"][3:3 + len(r["answers"][0]["text"])] == r["answers"][0]["text"] for r in test)
    train = load_examples(task, "en", "train", hub_mirror=mirror)
    assert [r["id"] for r in train] == [f"english--train{i}-0" for i in range(3)]


def test_a_missing_copy_names_the_command_that_downloads_it(tmp_path):
    with pytest.raises(DataError, match=r"huggingface-cli download indonlp/NusaX-senti --repo-type dataset "
                                        r"--revision refs/convert/parquet"):
        load_examples(task_config("nusax"), "jav", "test", hub_mirror=tmp_path)


def test_offline_a_dataset_loads_from_the_hub_cache_as_downloaded(tmp_path, mirror, monkeypatch):
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--indonlp--NusaX-senti"
    commit = "1" * 40
    (repo / "refs" / "refs" / "convert").mkdir(parents=True)
    (repo / "refs" / "refs" / "convert" / "parquet").write_text(commit)  # a branch named refs/convert/parquet
    shutil.copytree(mirror_folder(mirror, "indonlp/NusaX-senti", "refs/convert/parquet"), repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = load_examples(task_config("nusax"), "jav", "test")
    assert [r["text"] for r in rows] == [f"jav test {i}" for i in range(4)]
    with pytest.raises(DataError, match=r"not in the hub cache: `huggingface-cli download facebook/xnli --repo-type"):
        load_examples(task_config("xnli"), "sw", "test")
