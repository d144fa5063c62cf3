"""The method registry is the one list of methods: configs, tables, planner, benchmark and
golden test derive from it, and an unknown method is refused in one sentence everywhere."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from flare_exp import plan, sweep, tables
from flare_exp.methods import METHODS, ORDER, Method, register
from flare_exp.paper_results import paper_value
from flare_exp.report.experiments import command

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_has_its_config_file_and_every_file_its_method():
    files = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert files == set(METHODS)
    assert list(ORDER) == ["zero_shot", "translate_test", "lora", "xmixup", "input_fusion", "flare_mt", "flare"]


def test_every_method_is_costed_by_a_row_the_throughput_table_has():
    rows = {r["method"] for r in csv.DictReader((ROOT / "docs" / "throughput.csv").open())}
    assert {cls.cost_row for cls in METHODS.values()} <= rows
    measured = {name for name, cls in METHODS.items() if cls.cost_measured}
    assert measured == {"lora", "input_fusion", "flare"}  # the rows that measure the method itself


def test_a_method_that_trains_must_say_how_it_is_costed():
    class Unpriced(Method):
        name, adapter = "unpriced", "lora"

    with pytest.raises(TypeError, match="cost_row"):
        register(Unpriced)
    assert "unpriced" not in METHODS


def test_every_training_method_is_benchmarked_and_every_method_has_the_papers_numbers():
    assert all(cls.bench for cls in METHODS.values() if cls.adapter is not None)
    assert all(paper_value("xnli", "llama3.1-8b", name) is not None for name in METHODS)
    assert paper_value("tydiqa", "gemma2-9b", "flare") == 52.14 and paper_value("tydiqa", "gemma2-9b", "x") is None


@pytest.mark.parametrize("main", [plan.main, tables.main, sweep.main], ids=["plan", "tables", "sweep"])
def test_an_unknown_method_is_one_sentence_in_every_command(main, capsys, tmp_path):
    status = command(lambda: main(["experiment=demo", "method.name=bogus", f"output_dir={tmp_path}"]))
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: Unknown method 'bogus'") and "\n" not in err
