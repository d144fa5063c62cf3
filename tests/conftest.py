"""The environment of every test (offline, no W&B) and the data and configs the test modules
share, as fixtures. Helpers called with arguments are in helpers.py, tiny models in tiny.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def make_cfg():
    """The config factory: ``make_cfg(overrides, output_dir=None)`` composes the root config
    with ``overrides`` (and ``output_dir=<output_dir>``, where given)."""
    return helpers.make_cfg


@pytest.fixture
def small() -> list[str]:
    """The overrides of a small, fast demo run (48 training and 24 test examples, one epoch of
    each stage); a fresh list for each test."""
    return list(helpers.SMALL)


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory):
    """A local TyDiQA-GoldP data directory: 40 English training questions, 12 English and 12
    Swahili test questions."""
    root = tmp_path_factory.mktemp("data")
    helpers.squad_file(root / "tydiqa_goldp/train/tydiqa.goldp.en.train.json", "en", 40, 1)
    helpers.squad_file(root / "tydiqa_goldp/dev/tydiqa.goldp.en.dev.json", "en", 12, 2)
    helpers.squad_file(root / "tydiqa_goldp/dev/tydiqa.goldp.sw.dev.json", "sw", 12, 3)
    return root
