"""The three paper tables' datasets load through the hub loading code, from local copies laid out
as the hub repositories are: XNLI (parquet, a config per language), TyDiQA-GoldP (parquet
configs, languages told apart by their ids) and NusaX-senti (a loading script alone on the main
branch, which the pinned datasets refuses, beside its parquet conversion on refs/convert/parquet)."""

from __future__ import annotations

import pytest

from flare_exp.data import DataError, load_examples
from flare_exp.data.replicas import write_replica
from flare_exp.data.tasks import mirror_folder, task_config

NUSAX_LABELS = ["negative", "neutral", "positive"]
XNLI_LABELS = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    nusax, xnli, tydiqa = task_config("nusax"), task_config("xnli"), task_config("tydiqa")
    names = {"en": "eng", "jav": "jav"}
    write_replica(root, nusax, {
        (lang, split): [{"text": f"{names[lang]} {split} {i}", "label": NUSAX_LABELS[i % 3]} for i in range(n)]
        for lang in names for split, n in (("train", 5), ("validation", 3), ("test", 4))})
    write_replica(root, xnli, {
        (code, split): [{"premise": f"{code} p{i}", "hypothesis": f"{code} h{i}", "label": XNLI_LABELS[(i + 1) % 3]}
                        for i in range(n)]
        for code in ("en", "sw") for split, n in (("train", 6), ("validation", 3), ("test", 3))})
    write_replica(root, tydiqa, {
        (code, split): [{"id": f"{name}--{hub_split}{i}-0", "context": f"In {name}--{hub_split}{i}-0 it rained.",
                         "question": "When?", "answers": [{"text": f"{name}--{hub_split}{i}-0", "answer_start": 3}]}
                        for i in range(3)]
        for code, name in (("en", "english"), ("sw", "swahili"))
        for split, hub_split in (("train", "train"), ("test", "validation"))})
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


def test_a_copy_written_again_is_read_again_not_served_from_the_cache(tmp_path):
    """datasets names a local folder's cache after its name and file patterns: every XNLI copy
    (<mirror>/facebook/xnli/main) would get the first one's arrow files."""
    task = task_config("xnli")

    def write(root, word):
        write_replica(root, task, {(code, split): [{"premise": f"{word} {i}", "hypothesis": "h", "label": "neutral"}
                                                    for i in range(2)]
                                   for code in ("en", "sw") for split in ("train", "validation", "test")})

    write(tmp_path / "a", "first")
    assert load_examples(task, "sw", "test", hub_mirror=tmp_path / "a")[0]["premise"] == "first 0"
    write(tmp_path / "b", "second")  # another copy
    assert load_examples(task, "sw", "test", hub_mirror=tmp_path / "b")[0]["premise"] == "second 0"
    import shutil

    shutil.rmtree(tmp_path / "a")
    write(tmp_path / "a", "third")  # the same copy, written again
    assert load_examples(task, "sw", "test", hub_mirror=tmp_path / "a")[0]["premise"] == "third 0"
