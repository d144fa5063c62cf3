"""Evaluation-time English sources change exactly the English, as asked."""

from __future__ import annotations

import copy
import json
import random

import pytest

from flare_exp.sources import derangement, english_source, noise_text

TARGETS = [{"id": f"t{i}", "text": f"kata {i} iki", "label": "positive"} for i in range(50)]
ENGLISH = [{"id": f"t{i}", "text": f"this is sentence number {i} of the test", "label": "positive"} for i in range(50)]


@pytest.mark.parametrize("mode", ["as_trained", "noised", "mismatched", "target", "empty"])
def test_only_the_english_changes(mode):
    targets, english = copy.deepcopy(TARGETS), copy.deepcopy(ENGLISH)
    out = english_source(english, targets, ["text"], mode, rate=0.3, seed=1)
    assert targets == TARGETS and english == ENGLISH  # inputs untouched
    assert [ex["id"] for ex in out] == [ex["id"] for ex in ENGLISH] and all(ex["label"] == "positive" for ex in out)
    texts = [ex["text"] for ex in out]
    if mode == "as_trained":
        assert texts == [ex["text"] for ex in ENGLISH]
    elif mode == "target":
        assert texts == [ex["text"] for ex in TARGETS]
    elif mode == "empty":
        assert set(texts) == {""}
    elif mode == "mismatched":
        assert sorted(texts) == sorted(ex["text"] for ex in ENGLISH)
        assert all(t != ex["text"] for t, ex in zip(texts, ENGLISH))
    else:
        assert texts != [ex["text"] for ex in ENGLISH]
        assert out == english_source(ENGLISH, TARGETS, ["text"], mode, rate=0.3, seed=1)  # seeded
        assert out != english_source(ENGLISH, TARGETS, ["text"], mode, rate=0.3, seed=2)


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 3), (1000, 5)])
def test_the_mismatch_is_a_seeded_derangement(n, seed):
    order = derangement(n, seed)
    assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
    assert order == derangement(n, seed)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_noise_is_applied_at_the_requested_rate(rate):
    words = [f"w{i}" for i in range(20000)]
    counts = {}
    noised = noise_text(" ".join(words), rate, random.Random(0), words, counts)
    assert counts["words"] == 20000 and abs(counts["noised"] / 20000 - rate) < 0.015
    kept = sum(a == b for a, b in zip(noised.split(), words))  # position by position, until a drop shifts it
    assert noised != " ".join(words) and kept < 20000


def test_unknown_modes_and_rates_are_refused():
    with pytest.raises(ValueError, match="Unknown source mode"):
        english_source(ENGLISH, TARGETS, ["text"], "shuffled")
    with pytest.raises(ValueError, match="source.rate"):
        english_source(ENGLISH, TARGETS, ["text"], "noised", rate=0.0)


def test_a_finished_run_is_re_evaluated_with_each_source_beside_it(tmp_path, make_cfg, small):
    from flare_exp.errors import ConfigError, InputsMissing
    from flare_exp.stages import run
    from helpers import run_path

    base = ["model=tiny-bert", "lang=dma", "method=flare", *small]
    with pytest.raises(InputsMissing, match="No finished run"):
        run(make_cfg([*base, "stage=evaluate"], tmp_path))
    trained = run(make_cfg(base, tmp_path))
    out = run_path(tmp_path, "runs/demo/tiny-bert/gold/flare/dma/seed100")
    again = run(make_cfg([*base, "stage=evaluate"], tmp_path))
    assert again["metrics"] == trained["metrics"]  # the saved adapter, the same English: the same scores
    assert (out / "sources/as_trained/predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    assert again["source"]["quality_to_trained_english"]["text"]["chrf"] == pytest.approx(100.0)
    written = (out / "sources/as_trained/results.json").stat().st_mtime_ns
    assert run(make_cfg([*base, "stage=evaluate"], tmp_path)) == again  # done: skipped, not evaluated again
    assert (out / "sources/as_trained/results.json").stat().st_mtime_ns == written
    noised = run(make_cfg([*base, "stage=evaluate", "source.mode=noised", "source.rate=0.3"], tmp_path))
    assert (out / "sources/noised-0.3-seed0/results.json").is_file()
    assert noised["source"]["quality_to_trained_english"]["text"]["chrf"] < 90
    empty = run(make_cfg([*base, "stage=evaluate", "source.mode=empty"], tmp_path))
    assert json.loads((out / "results.json").read_text())["metrics"] == trained["metrics"]  # the run's own untouched
    assert empty["source"]["label"] == "empty"
    retrained = run(make_cfg([*base, "force=true"], tmp_path))
    assert retrained["timing"] != trained["timing"]  # the run trained again: its old evaluations are stale
    assert run(make_cfg([*base, "stage=evaluate"], tmp_path))["timing"] == retrained["timing"]
    assert (out / "sources/as_trained/results.json").stat().st_mtime_ns != written
    with pytest.raises(ConfigError, match="reads no English at test"):
        run(make_cfg(["model=tiny-bert", "lang=dma", "method=lora", *small, "stage=evaluate"], tmp_path))
    with pytest.raises(ConfigError, match="add stage=evaluate"):
        run(make_cfg([*base, "source.mode=empty"], tmp_path))


def test_the_sensitivity_table_reads_the_evaluations_and_the_lora_baseline(tmp_path, make_cfg, small):
    from flare_exp.report.sensitivity import collect, table
    from flare_exp.stages import run

    args = ["model=tiny-bert", "lang=dmb", *small]
    for method in ("flare", "lora"):
        run(make_cfg(["experiment=demo", f"method={method}", *args], tmp_path))
    for source in ("as_trained", "empty", "mismatched"):
        run(make_cfg(["experiment=demo", "method=flare", "stage=evaluate", f"source={source}", *args], tmp_path))
    sweep = [*args, f"output_dir={tmp_path}", "stage=evaluate", "hydra.sweeper.params.method=flare",
             "+hydra.sweeper.params.source='mismatched,as_trained,empty,target'"]
    frame, missing = collect("demo", sweep)
    assert missing == [{"method": "flare", "source": "target"}]
    assert sorted(frame["source"]) == ["(none)", "as_trained", "empty", "mismatched-seed0"]
    assert frame.set_index("source").loc["(none)", "method"] == "lora"
    markdown = table(frame)
    assert markdown.splitlines()[0] == "| method | as_trained | mismatched-seed0 | empty | (none) |"
    assert "| flare |" in markdown and "| lora |" in markdown


def test_the_sensitivity_table_can_give_the_share_of_invalid_outputs():
    import pandas as pd

    from flare_exp.report.sensitivity import table

    frame = pd.DataFrame([
        {"method": "flare", "lang": "jav", "seed": 100, "source": "as_trained", "score": 80.0, "invalid": 2.0, "chrf": 100.0, "metric": "macro_f1"},
        {"method": "flare", "lang": "sun", "seed": 100, "source": "as_trained", "score": 70.0, "invalid": 4.0, "chrf": 100.0, "metric": "macro_f1"},
        {"method": "flare", "lang": "jav", "seed": 100, "source": "empty", "score": 30.0, "invalid": 50.0, "chrf": 0.0, "metric": "macro_f1"},
        {"method": "lora", "lang": "jav", "seed": 100, "source": "(none)", "score": 60.0, "invalid": 1.0, "chrf": float("nan"), "metric": "macro_f1"},
    ])
    assert "| flare | 75.00 (2) | 30.00 (1) | – |" in table(frame)
    invalid = table(frame, "invalid")
    assert "| flare | 3.00 (2) | 50.00 (1) | – |" in invalid
    assert "| lora | – | – | 1.00 (1) |" in invalid


def test_the_sensitivity_table_gives_mean_and_std_over_seeds_of_the_average_over_languages():
    """As the main tables: each seed's average over its languages, then mean ± std over seeds
    (not the mean of all runs, which would weigh a seed by its number of languages)."""
    import pandas as pd

    from flare_exp.report.sensitivity import table

    def row(lang, seed, score, source="as_trained", method="flare"):
        return {"method": method, "lang": lang, "seed": seed, "source": source, "score": score, "invalid": 0.0,
                "chrf": 100.0, "metric": "macro_f1"}

    frame = pd.DataFrame([row("jav", 100, 80.0), row("sun", 100, 70.0), row("jav", 101, 90.0),
                          row("jav", 100, 30.0, "empty"), row("jav", 100, 60.0, "(none)", "lora"),
                          row("jav", 101, 64.0, "(none)", "lora")])
    markdown = table(frame)
    assert "| flare | 82.50 ± 10.61 (3) | 30.00 (1) | – |" in markdown  # (75 + 90) / 2; std of 75, 90
    assert "| lora | – | – | 62.00 ± 2.83 (2) |" in markdown


def test_an_evaluate_sweep_points_at_the_sensitivity_table(tmp_path, capsys):
    from omegaconf import OmegaConf

    from flare_exp.report.summary import SweepSummary

    for stage, expected in [("evaluate", "python -m flare_exp.sensitivity experiment=nusax_cpu_sensitivity"),
                            ("run", "No finished runs")]:
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "stage": stage,
                                   "experiment_name": "nusax_cpu_sensitivity"})
        SweepSummary().on_multirun_end(config)
        assert expected in capsys.readouterr().out


def test_a_job_knows_whether_its_work_is_done(tmp_path, make_cfg, small):
    """``finished``: what a SLURM sweep leaves out when it submits (a run's results of the same
    settings, an evaluation of the run now in place, a cached stage 1; never with force=true)."""
    from flare_exp.errors import ConfigError
    from flare_exp.record import finished, run_dir
    from flare_exp.stages import run

    base = ["model=tiny-bert", "lang=dma", "method=flare", *small]
    stages = {stage: make_cfg([*base, f"stage={stage}"], tmp_path) for stage in ("run", "stage1", "stage2", "evaluate")}
    assert not any(finished(cfg) for cfg in stages.values())
    run(stages["stage1"])
    assert finished(stages["stage1"]) and not finished(stages["run"])
    run(stages["run"])
    assert finished(stages["run"]) and finished(stages["stage2"]) and not finished(stages["evaluate"])
    assert not finished(make_cfg([*base, "train.lr=0.002"], tmp_path))  # other settings: another run
    assert not finished(make_cfg([*base, "force=true"], tmp_path))
    run(stages["evaluate"])
    assert finished(stages["evaluate"]) and not finished(make_cfg([*base, "stage=evaluate", "source=empty"], tmp_path))
    assert not finished(make_cfg([*base, "stage=translate", "mt=fake"], tmp_path))
    # A run folder holding other settings (edited by hand, copied): the job would refuse to run,
    # so the sweep stops before submitting it.
    results = run_dir(stages["run"]) / "results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "identity": {"other": 1}}))
    with pytest.raises(ConfigError, match="holds a run of other settings"):
        finished(stages["stage2"])
