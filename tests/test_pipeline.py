"""The experiment pipeline: configs, validation, end-to-end runs on tiny models, caching."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flare_exp.errors import ConfigError
from flare_exp.record import run_dir, stage1_dir
from flare_exp.setup import check
from flare_exp.stages import run
from helpers import CONF, ROOT, offline_env, run_path, run_py

GROUPS = ["model", "task", "method", "lang", "mt", "train", "tracking", "source"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes(group, make_cfg):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = make_cfg([f"{group}={option}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_file_composes(experiment, make_cfg):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"experiment={experiment}" in text
    cfg = make_cfg([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    assert cfg.lang.code in cfg.task.languages or "lang" in text


def test_root_defaults_are_the_paper_headline_setting(make_cfg):
    cfg = make_cfg([])
    assert (cfg.task.name, cfg.model.name, cfg.mt.name) == ("tydiqa", "llama3.1-8b", "nllb_3_3b")
    assert cfg.model.quantization == "nf4" and cfg.model.dtype == "bfloat16"


def test_offline_default_stops_before_loading_with_the_alternative(monkeypatch, make_cfg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"huggingface-cli download meta-llama/Llama-3\.1-8B`.*experiment=demo"):
        check(make_cfg(["method=flare", "lang=sw"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task=demo", "lang=sw", "mt=gold", "model=minilm"], r"no language 'sw'.*\['dma', 'dmb'\]"),
        (["task=xnli", "lang=xx"], None),
        (["task=tydiqa", "lang=sw", "mt=gold", "method=translate_test"], r"not parallel.*nllb"),
    ],
)
def test_invalid_combinations_are_refused_in_one_sentence(overrides, message, make_cfg):
    if message is None:  # an unknown language file fails at composition already
        with pytest.raises(Exception, match="lang"):
            make_cfg(overrides)
        return
    with pytest.raises(ConfigError, match=message):
        check(make_cfg(overrides))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_end_to_end_every_method_with_cached_stage1(tmp_path, model, capsys, make_cfg, small):
    results = {}
    for method in ["zero_shot", "translate_test", "lora", "flare"]:
        cfg = make_cfg([f"model={model}", "lang=dmb", f"method={method}", *small], tmp_path)
        results[method] = run(cfg)
    stage1_dirs = list((tmp_path / "stage1").glob("*/*/*"))
    assert [p.name for p in stage1_dirs if not p.name.endswith(".lock")] == [stage1_dir(cfg).name]
    for method, result in results.items():
        path = run_path(tmp_path, f"runs/demo/{model}/gold/{method}/dmb/seed100") / "results.json"
        on_disk = json.loads(path.read_text())
        assert on_disk["metrics"] == result["metrics"]
        assert on_disk["metrics"]["n"] == 24 and 0 <= on_disk["metrics"]["accuracy"] <= 1
        assert on_disk["stage1"]["dir"] == str(stage1_dir(cfg))
        predictions = (path.parent / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 24
        if method in ("lora", "flare"):
            stage2 = on_disk["stage2_train"]
            assert stage2["steps"] == 3
            # Validated at every step (a tenth of 3 steps, at least 1), the best one selected.
            curve = stage2["validation"]
            assert [v["step"] for v in curve] == [1, 2, 3] and stage2["selection"] == "best"
            best = max(v["score"] for v in curve)
            assert stage2["selected_step"] == next(v["step"] for v in curve if v["score"] == best)
    # Stage 1 was trained once: every run's record points at the same stage-1 training.
    assert len({json.dumps(r["stage1"], sort_keys=True) for r in results.values()}) == 1
    capsys.readouterr()
    again = run(make_cfg([f"model={model}", "lang=dmb", "method=flare", *small], tmp_path))
    assert "[skipped" in capsys.readouterr().out
    assert again["metrics"] == results["flare"]["metrics"]


def test_multirun_two_methods_two_languages(tmp_path, small):
    done = run_py(["-m", "model=tiny-bert", "method=lora,flare", "lang=dma,dmb", *small,
                    f"output_dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("runs/demo/tiny-bert/gold/*/*/seed100-*/results.json"))
    assert [(p.parts[-4], p.parts[-3]) for p in results] == [
        ("flare", "dma"), ("flare", "dmb"), ("lora", "dma"), ("lora", "dmb")]
    summaries = list(tmp_path.glob("sweeps/*/summary.csv"))
    assert len(summaries) == 1
    import pandas as pd

    frame = pd.read_csv(summaries[0])
    assert sorted(zip(frame["method"], frame["lang"])) == [
        ("flare", "dma"), ("flare", "dmb"), ("lora", "dma"), ("lora", "dmb")]
    assert "dma" in done.stdout and "flare" in done.stdout  # the printed table


@pytest.mark.slow
def test_concurrent_jobs_train_stage1_once(tmp_path, small):
    args = ["model=tiny-bert", "lang=dma", *small, f"output_dir={tmp_path}"]
    env = offline_env()
    jobs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"method={m}", *args], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for m in ("lora", "flare")]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    trained = sum(out.count("Training stage 1") for out in outputs)
    assert trained == 1, outputs
    stage1 = [p for p in (tmp_path / "stage1/demo/tiny-bert").iterdir() if not p.name.endswith(".lock")]
    assert len(stage1) == 1 and (stage1[0] / "adapter_model.safetensors").is_file()


def test_task_model_specialisation_applies_to_its_pair_only(make_cfg):
    assert make_cfg(["task=xnli", "model=smollm2-135m"]).task.max_length == 192
    assert make_cfg(["task=xnli", "model=minilm"]).task.max_length == 128


def test_wandb_offline_run_is_written_inside_the_run_directory(tmp_path, make_cfg, small):
    cfg = make_cfg(["model=tiny-bert", "lang=dma", "method=zero_shot", "tracking=offline", *small], tmp_path)
    result = run(cfg)
    folder = run_path(tmp_path, "runs/demo/tiny-bert/gold/zero_shot/dma/seed100")
    assert list(folder.glob("wandb/offline-run-*")), "no offline W&B run in the run directory"
    assert json.loads((folder / "results.json").read_text())["metrics"] == result["metrics"]


@pytest.mark.slow
def test_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, make_cfg):
    import signal
    import time

    args = ["model=tiny-bert", "lang=dma", "method=flare", "task=demo", "mt=gold", "data.max_train=160",
            "data.max_test=24", "train.epochs=3", "train.batch_size=8", "train.lr=1e-3",
            "train.checkpoint_every=2"]
    reference = run_py([*args, f"output_dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    env = offline_env()
    job = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"output_dir={out}"], cwd=tmp_path,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir(make_cfg(args, out)) / "checkpoint"
    deadline = time.time() + 300
    while not (checkpoint / "state.pt").is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint.is_dir()
    resumed = run_py([*args, f"output_dir={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming stage 2" in resumed.stdout
    assert not checkpoint.exists()

    def record(root):
        path = run_path(root, "runs/demo/tiny-bert/gold/flare/dma/seed100")
        result = json.loads((path / "results.json").read_text())
        return result["metrics"], result["stage2_train"]["steps"], (path / "predictions.jsonl").read_text()

    expected, got = record(tmp_path / "straight"), record(out)
    assert got == expected
    straight_loss = json.loads((run_path(tmp_path / "straight", "runs/demo/tiny-bert/gold/flare/dma/seed100")
                                / "results.json").read_text())
    killed_loss = json.loads((run_path(out, "runs/demo/tiny-bert/gold/flare/dma/seed100") / "results.json").read_text())
    assert killed_loss["stage2_train"]["last_epoch_loss"] == pytest.approx(straight_loss["stage2_train"]["last_epoch_loss"], abs=1e-6)


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path, small):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    done = run_py(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "model=tiny-bert",
                    "method=lora,flare", "lang=dma", *small, f"output_dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(p.parts[-4] for p in tmp_path.glob("runs/demo/tiny-bert/gold/*/dma/seed100-*/results.json"))
    assert results == ["flare", "lora"]
    (summary,) = tmp_path.glob("sweeps/*/summary.csv")
    assert len(summary.read_text().splitlines()) == 3  # header + two jobs
    stage1 = [p for p in (tmp_path / "stage1/demo/tiny-bert").iterdir() if not p.name.endswith(".lock")]
    assert len(stage1) == 1  # the two concurrent jobs shared one stage 1


@pytest.mark.slow
def test_failed_job_does_not_stop_the_sweep(tmp_path, small):
    done = run_py(["-m", "model=tiny-bert", "method=lora", "lang=dma,sw", *small, f"output_dir={tmp_path}"],
                   cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED job 1" in done.stdout and "no language 'sw'" in done.stdout
    assert (run_path(tmp_path, "runs/demo/tiny-bert/gold/lora/dma/seed100") / "results.json").is_file()
    (summary,) = tmp_path.glob("sweeps/*/summary.csv")
    assert "dma" in summary.read_text()


def test_every_model_config_states_its_adapter_layout(make_cfg):
    for path in sorted((CONF / "model").glob("*.yaml")):
        cfg = make_cfg([f"model={path.stem}"]).model
        for key in ("lora_targets", "fuse_modules", "padding_side", "quantization", "prompt_format"):
            assert key in cfg, f"{path.name} lacks {key}"
        assert cfg.prompt_format == ("head" if cfg.kind == "encoder" else "plain")
        assert cfg.padding_side == ("left" if cfg.kind == "decoder" else "right")


def test_a_run_is_identified_by_every_setting_that_changes_its_result(tmp_path, capsys, make_cfg, small):
    base = ["model=tiny-bert", "lang=dma", "method=lora", *small]
    first = run(make_cfg([*base, "train.lr=1e-3"], tmp_path))
    second = run(make_cfg([*base, "train.lr=2e-3"], tmp_path))
    out = capsys.readouterr().out
    assert "[skipped" not in out
    assert out.count("Training stage 1") == 1  # a stage-2 setting reuses the cached stage 1
    assert first["stage1"] == second["stage1"]
    assert first["run_id"] != second["run_id"]
    assert first["identity"]["train"]["lr"] == 1e-3 and second["identity"]["train"]["lr"] == 2e-3
    assert first["stage2_train"]["last_epoch_loss"] != second["stage2_train"]["last_epoch_loss"]
    runs = sorted(tmp_path.glob("runs/demo/tiny-bert/gold/lora/dma/seed100-*/results.json"))
    assert len(runs) == 2
    # The same settings again: skipped, the first run's record returned. Where it is written,
    # tracked or placed does not make another run.
    again = run(make_cfg([*base, "train.lr=1e-3", "train.checkpoint_every=7", "device=cpu"], tmp_path))
    assert "[skipped" in capsys.readouterr().out and again == first

    # Both appear in a summary, never averaged into one cell.
    from flare_exp.report.results import format_table, load_results

    frame = load_results(runs)
    assert sorted(frame["method"]) == ["lora [train.lr=0.001]", "lora [train.lr=0.002]"]
    assert "lora [train.lr=0.002]" in format_table(frame, "accuracy")


def test_a_stage1_setting_trains_another_stage1(tmp_path, capsys, make_cfg, small):
    base = ["model=tiny-bert", "lang=dma", "method=zero_shot", *small]
    first = run(make_cfg(base, tmp_path))
    second = run(make_cfg([*base, "stage1.lr=5e-3"], tmp_path))
    assert capsys.readouterr().out.count("Training stage 1") == 2
    assert first["stage1"]["dir"] != second["stage1"]["dir"] and first["run_id"] != second["run_id"]


def test_a_capped_smoke_run_never_stands_in_for_the_full_run(tmp_path, capsys, make_cfg, small):
    base = ["model=tiny-bert", "lang=dma", "method=zero_shot", *[o for o in small if "max_test" not in o]]
    smoke = run(make_cfg([*base, "data.max_test=8"], tmp_path))
    full = run(make_cfg([*base, "data.max_test=24"], tmp_path))
    assert "[skipped" not in capsys.readouterr().out
    assert smoke["metrics"]["n"] == 8 and full["metrics"]["n"] == 24


def test_a_results_file_of_other_settings_is_not_taken_for_this_run(tmp_path, make_cfg, small):
    cfg = make_cfg(["model=tiny-bert", "lang=dma", "method=zero_shot", *small], tmp_path)
    result = run(cfg)
    path = run_dir(cfg) / "results.json"
    path.write_text(json.dumps({**result, "identity": {**result["identity"], "seed": 7}}))
    with pytest.raises(ConfigError, match="holds a run of other settings"):
        run(cfg)


def test_official_precision_and_optimizer_run_end_to_end(tmp_path, make_cfg, small):
    result = run(make_cfg(["model=tiny-bert", "lang=dma", "method=flare", *small, "train.autocast=bfloat16",
                           "stage1.autocast=bfloat16", "train.optimizer=adamw_8bit"], tmp_path))
    assert result["identity"]["train"]["optimizer"] == "adamw_8bit" and result["metrics"]["n"] == 24
    assert make_cfg(["model=xlmr-large"]).train.autocast == "bfloat16"
    assert make_cfg(["model=gemma2-9b"]).train.optimizer == "adamw_8bit"


def test_wandb_gets_every_step_validation_and_stage1_scores_grouped_and_tagged(tmp_path, monkeypatch, make_cfg, small):
    wandb = pytest.importorskip("wandb")

    class Run:
        def __init__(self, **kwargs):
            self.init, self.logged, self.summary = kwargs, [], {}

        def log(self, values, step=None):
            self.logged.append((step, values))

        def finish(self):
            pass

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(Run(**kwargs)) or runs[-1])
    run(make_cfg(["model=tiny-bert", "lang=dma", "method=lora", "tracking=offline", "experiment_name=study",
                  *small, "train.epochs=2"], tmp_path))
    (wb,) = runs
    assert wb.init["group"] == "study" and {"lora", "dma", "seed100", "demo", "tiny-bert"} <= set(wb.init["tags"])
    steps = [(s, v) for s, v in wb.logged if s is not None]
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) == 6  # 48 examples / 16, 2 epochs
    assert all({"train/loss", "train/lr", "train/grad_norm"} <= set(v) for _, v in steps)
    rates = [v["train/lr"] for _, v in steps]  # the linear schedule, from train.lr down
    assert rates[0] == pytest.approx(1e-3) and rates == sorted(rates, reverse=True) and rates[-1] < rates[0]
    assert sum("validation/score" in v for _, v in steps) >= 2 and "validation/score" in steps[-1][1]
    assert any("test/accuracy" in v for _, v in wb.logged) and "stage1_english/accuracy" in wb.summary


@pytest.mark.parametrize("method", ["flare", "input_fusion"])
def test_the_saved_stage2_adapter_reproduces_the_runs_predictions(tmp_path, method, make_cfg, small):
    """A run saves its trained stage 2; the same method rebuilt on the cached stage 1 with that
    adapter predicts exactly what the run predicted (re-evaluation without retraining)."""
    import torch

    from flare_exp import adapters, record
    from flare_exp.evaluate import predict
    from flare_exp.setup import Setup

    cfg = make_cfg(["model=tiny-bert", "lang=dma", f"method={method}", *small], tmp_path)
    run(cfg)
    out = run_path(tmp_path, f"runs/demo/tiny-bert/gold/{method}/dma/seed100")
    expected = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    setup = Setup(cfg)
    chosen = setup.method
    model = adapters.build(chosen, setup.stage1(), cfg.model, cfg.train, cfg.seed,
                           adapters.stage2_head(cfg.model, cfg.task), setup.mt_encoder)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adapters.load(model, out / record.ADAPTER)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    test, english = setup.pairs.test(english=chosen.reads_english_test)
    inputs, source = chosen.inputs(test, english, list(cfg.task.fields), False)
    rows = predict(model, setup.batcher, inputs, source, 32, setup.device, cfg.task.max_new_tokens, "again")
    assert [r["prediction"] for r in rows] == expected
