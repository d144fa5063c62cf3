"""An experiment's sweep as dependent stages (translation, stage 1, stage 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flare_exp.errors import InputsMissing
from flare_exp.stages import run
from flare_exp.sweep import stage_commands
from helpers import ROOT, offline_env

DEMO = ["mt=fake", "model=tiny-bert", "lang=dma", "data.max_train=48", "data.max_test=24", "data.max_validation=24",
        "train.epochs=1", "stage1.epochs=1", "train.batch_size=16", "stage1.batch_size=16"]


@pytest.mark.slow
def test_the_stages_run_in_order_locally(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flare_exp.sweep", "experiment=demo", *DEMO, f"output_dir={tmp_path}"],
                          cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("== ")] == [
        "== translate", "== stage1", "== stage2"]
    results = sorted(tmp_path.glob("runs/demo/tiny-bert/fake/*/dma/seed100-*/results.json"))
    assert sorted(p.parts[-4] for p in results) == ["flare", "lora", "translate_test", "zero_shot"]
    (stage1,) = tmp_path.glob("stage1/demo/tiny-bert/*/stage1.json")
    for path in results:  # every stage-2 job started after stage 1 had finished
        assert json.loads(path.read_text())["timing"]["started_at"] >= stage1.stat().st_mtime
    assert len(list(tmp_path.glob("sweeps/*-translate/0"))) == 1  # one translation job, not one per method


def test_stage2_without_its_inputs_fails_at_once_naming_the_stage(tmp_path, make_cfg):
    cfg = make_cfg(["task=demo", *DEMO, "method=lora", "stage=stage2"], tmp_path)
    with pytest.raises(InputsMissing, match=r"Stage 1 of demo tiny-bert seed 100 .* run stage=stage1 first"):
        run(cfg)
    run(make_cfg(["task=demo", *DEMO, "stage=stage1"], tmp_path))
    with pytest.raises(InputsMissing, match=r"48 en-x translations of demo train \(dma\) .* run stage=translate first"):
        run(cfg)
    assert not list(tmp_path.glob("runs/*/*/*/lora"))  # nothing was trained
    run(make_cfg(["task=demo", *DEMO, "stage=translate"], tmp_path))
    assert run(cfg)["metrics"]["n"] == 24


def test_slurm_stages_are_chained_by_dependencies(tmp_path):
    small = ["hydra.sweeper.params.lang='ace,jav'", "hydra.sweeper.params.model='xlmr-large,mt5-xl'",
             "hydra.sweeper.params.method='zero_shot,flare'"]
    stages = dict(stage_commands("paper_nusax", small, "slurm", wait=False, ids=tmp_path))
    assert list(stages) == ["translate", "stage1", "stage2"]
    translate, stage1, stage2 = stages.values()
    # each stage sweeps what it depends on, the rest pinned
    assert "hydra.sweeper.params.model=xlmr-large" in translate and "hydra.sweeper.params.method=zero_shot" in translate
    assert "hydra.sweeper.params.lang=ace" in stage1 and "hydra.sweeper.params.model=xlmr-large" not in stage1
    assert not any(a.startswith("hydra.sweeper.params") and "='" not in a for a in stage2)  # nothing pinned
    # stage 2 waits for translation and stage 1 (afterany); stage 1 needs no translation
    assert f"chain.after=[{tmp_path / 'translate.ids'},{tmp_path / 'stage1.ids'}]" in stage2
    assert not any(a.startswith("chain.after") for a in translate + stage1)
    assert all("chain.wait=false" in s for s in stages.values())
    assert "chain.wait=true" in dict(stage_commands("paper_nusax", small, "slurm", wait=True, ids=tmp_path))["stage2"]


def test_gold_experiments_have_no_translation_stage(tmp_path):
    stages = [s for s, _ in stage_commands("nusax_cpu", ["data.dir=/nowhere", "hydra.sweeper.params.lang=ace",
                                                         "hydra.sweeper.params.seed=100"], "local", wait=False,
                                           ids=tmp_path)]
    assert stages == ["stage1", "stage2"]


def test_two_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Runs, sweeps and chains are named by the time to the microsecond (to the second, two
    sweeps a script started together shared one folder: each overwrote the other's job folders
    and its summary mixed both); a chain's folder is created, never reused."""
    import re
    from datetime import datetime

    from omegaconf import OmegaConf

    from flare_exp.sweep import chain_folder

    hydra = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra, resolve=False)
    for key in ("run", "sweep"):
        pattern = re.search(r"\$\{now:([^}]*)\}", hydra[key]["dir"]).group(1)
        first, second = (datetime(2026, 11, 26, 21, 34, 50, micro).strftime(pattern) for micro in (120_000, 870_000))
        assert first != second, key
    first, second = chain_folder(str(tmp_path), "demo"), chain_folder(str(tmp_path), "demo")
    assert first != second and first.is_dir() and second.is_dir()
