"""Everything checkable without a model is checked before any model loads, each error in one
sentence; failure markers follow what really happened to a job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flare_exp.data import DataError
from flare_exp.errors import ConfigError
from flare_exp.setup import check
from flare_exp.stages import run
from helpers import ROOT, offline_env, run_py

FIELDS = "id,text,label"


def _nusax(root: Path, rows: dict[str, list[str]]) -> Path:
    """A local NusaX layout with the given rows (``lang/split`` -> csv lines after the header)."""
    for key, lines in rows.items():
        lang, split = key.split("/")
        path = root / "nusax_senti" / lang / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([FIELDS, *lines]) + "\n", encoding="utf-8")
    return root


def _good(n: int = 4, prefix: str = "text") -> list[str]:
    return [f"{i},{prefix} {i},{['positive', 'neutral', 'negative'][i % 3]}" for i in range(n)]


def _data(tmp_path: Path, **changes) -> Path:
    rows = {f"{lang}/{split}": _good(prefix=lang) for lang in ("english", "javanese")
            for split in ("train", "valid", "test")}
    rows.update(changes)
    return _nusax(tmp_path / "data", rows)


@pytest.fixture
def nusax_cfg(tmp_path, make_cfg):
    """``nusax_cfg(data, *overrides)``: FLARE on tiny-bert, NusaX jav from ``data``, into tmp_path/out."""
    def compose(data: Path, *extra):
        return make_cfg(["task=nusax", "lang=jav", "mt=gold", "model=tiny-bert", "method=flare",
                         f"data.dir={data}", *extra], tmp_path / "out")
    return compose


@pytest.mark.parametrize("override,message", [
    ("method.fusion=add_rlu", r"Unknown fusion 'add_rlu'"),
    ("method.alignment=middle", r"Unknown alignment 'middle'"),
])
def test_a_method_setting_typo_is_refused_before_anything_runs(tmp_path, override, message, make_cfg):
    with pytest.raises(ConfigError, match=message):
        check(make_cfg(["task=demo", "lang=dma", "mt=gold", "model=tiny-bert", override]))


def test_xmixup_settings_are_checked(make_cfg):
    with pytest.raises(ConfigError, match="lambda0"):
        check(make_cfg(["task=demo", "lang=dma", "mt=gold", "model=tiny-bert", "method=xmixup",
                           "method.lambda0=1.5"]))


@pytest.mark.parametrize("change,message", [
    ({"javanese/test": ["0,x,positive", "1,x"]}, r"test.csv, row 2: expected the 3 columns id,text,label"),
    ({"javanese/train": _good(3)}, r"not parallel to the English data \(3 examples against 4\)"),
    ({"javanese/valid": ["0,a,positive", "1,b,positive", "2,c,negative", "3,d,positive"]},
     r"example 2 has label 'positive', its English 'neutral'"),
])
def test_bad_target_data_is_refused_before_stage1_trains(tmp_path, change, message, nusax_cfg):
    with pytest.raises(DataError, match=message):
        run(nusax_cfg(_data(tmp_path, **change)))
    assert not (tmp_path / "out" / "stage1").exists()  # nothing was trained


def test_an_undecodable_file_is_one_sentence_in_a_multirun(tmp_path):
    data = _data(tmp_path)
    (data / "nusax_senti" / "javanese" / "test.csv").write_bytes(f"{FIELDS}\n0,caf\xe9,positive\n".encode("latin-1"))
    done = run_py(["-m", "task=nusax", "lang=jav", "mt=gold", "model=tiny-bert", "method=zero_shot,lora",
                    f"data.dir={data}", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "UnicodeDecodeError" not in done.stderr
    assert done.stderr.count("is not UTF-8 text") == 2
    assert "2 of 2 job(s) of the sweep failed; none finished" in done.stderr + done.stdout
    assert not (tmp_path / "out" / "stage1").exists()


def test_empty_texts_are_counted_and_refused_on_request(tmp_path, capsys, nusax_cfg):
    data = _data(tmp_path, **{"javanese/test": ["0,,positive", "1, ,neutral", "2,c,negative", "3,d,positive"]})
    cfg = nusax_cfg(data, "method=zero_shot", "data.empty_texts=refuse")
    with pytest.raises(DataError, match=r"nusax has empty texts \(2 in jav test\)"):
        run(cfg)
    result = run(nusax_cfg(data, "method=zero_shot"))
    assert "warning: nusax has empty texts: 2 in jav test" in capsys.readouterr().out
    assert result["data"]["empty_texts"] == {"jav test": 2}
    # the setting cannot change a result: the same run either way
    assert "empty_texts" not in result["identity"]["data"]


def test_a_qa_answer_not_at_its_offset_is_refused(tmp_path, make_cfg):
    squad = {"data": [{"paragraphs": [{"context": "Nairobi is the capital of Kenya.", "qas": [
        {"id": "q1", "question": "Capital?", "answers": [{"text": "Nairobi", "answer_start": 0}]},
        {"id": "q2", "question": "Country?", "answers": [{"text": "Kenya", "answer_start": 3}]}]}]}]}
    root = tmp_path / "data" / "tydiqa_goldp"
    for split in ("train", "dev"):
        for lang in ("en", "sw"):
            path = root / split / f"tydiqa.goldp.{lang}.{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(squad))
    cfg = make_cfg(["task=tydiqa", "lang=sw", "mt=fake", "model=tiny-bert", "method=lora",
                    f"data.dir={tmp_path / 'data'}"], tmp_path / "out")
    with pytest.raises(DataError, match=r"1 answers are not found at their offset.*question q2"):
        run(cfg)


def _run_py_with(tmp_path: Path, behaviour: str) -> subprocess.CompletedProcess:
    """run.py with flare_exp.stages.run replaced: ``exit`` (what submitit does to a pre-empted job
    after requeueing it) or ``finish``."""
    code = f"""
import runpy, sys
import flare_exp.stages as stages
def fake(cfg, job_dir=None):
    if {behaviour!r} == "exit":
        sys.exit(-1)
    return {{}}
stages.run = fake
sys.argv = ["run.py", "task=demo", "lang=dma", "mt=gold", "model=tiny-bert", "hydra.run.dir={tmp_path / 'job'}"]
runpy.run_path({str(ROOT / 'run.py')!r}, run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_job_ended_by_systemexit_leaves_no_marker_and_a_finished_job_clears_one(tmp_path):
    done = _run_py_with(tmp_path, "exit")
    assert done.returncode != 0, done.stderr[-2000:]
    assert not (tmp_path / "job" / "FAILED").exists()
    (tmp_path / "job" / "FAILED").write_text("an earlier attempt\n")
    done = _run_py_with(tmp_path, "finish")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "job" / "FAILED").exists()


@pytest.mark.slow
def test_multirun_still_reports_an_unexpected_error_with_its_traceback(tmp_path, small):
    done = run_py(["-m", "model=tiny-bert", "method=lora", "lang=dma", *small, "train.optimizer=sgd",
                    f"output_dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 1
    assert "Unknown optimizer" in done.stderr and "Traceback" in done.stderr
    assert "1 of 1 job(s) of the sweep failed; none finished" in done.stderr + done.stdout


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", r"train\.lr must be a number in \(0, ∞\), got -1\."),
    ("stage1.epochs=0", r"stage1\.epochs must be an integer in \[1, ∞\), got 0\."),
    ("train.batch_size=0", r"train\.batch_size must be an integer"),
    ("train.grad_accum=0", r"train\.grad_accum must be an integer"),
    ("train.dropout=1.0", r"train\.dropout must be a number in \[0, 1\)"),
    ("stage1.warmup_ratio=2", r"stage1\.warmup_ratio must be a number in \[0, 1\]"),
    ("train.r=0", r"train\.r must be an integer"),
    ("data.max_train=0", r"data\.max_train must be an integer"),
])
def test_a_bad_training_setting_is_refused_before_stage1_trains(tmp_path, override, message, make_cfg, small):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(["model=tiny-bert", "lang=dmb", "method=lora", *small, override], tmp_path))
    assert not (tmp_path / "stage1").exists()  # nothing trained, no model loaded
