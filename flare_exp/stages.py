"""The stages of a run, each a short recipe over its ``Setup``:

    translate   fill the translation caches of (task, language)
    stage1      train (or find) the English stage-1 adapter
    run/stage2  stage 1 -> the method's stage 2 -> evaluation -> results.json
    evaluate    a finished run's saved stage 2 again, with another test-time English

    config -> Setup (checks, data, model, once) -> train -> evaluate -> results.json -> tables
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import adapters, distributed, record
from .errors import ConfigError, InputsMissing
from .memory import fitted
from .setup import Setup, _choices
from .sources import english_source
from .tracking import tracker
from .translate import translation_quality


def run(cfg: DictConfig, job_dir: Path | None = None) -> dict | None:
    """Run the stage ``cfg.stage`` of one (task, model, method, lang, seed); its report or record."""
    setup = Setup(fitted(cfg))  # with the memory remedy its GPU needs (the same config where none)
    stage = {"translate": translate, "stage1": stage1, "evaluate": evaluate}.get(cfg.stage, train_and_test)
    return stage(setup, job_dir) if stage is train_and_test else stage(setup)


def translate(setup: Setup) -> dict:
    """``stage=translate``: fill the translation cache of (task, lang) and report on it."""
    if setup.gold:
        raise ConfigError("stage=translate needs an MT system: choose mt from "
                          f"{[m for m in _choices('mt') if m != 'gold']}.")
    task, pairs, started = setup.task, setup.pairs, time.perf_counter()
    targets, _, info = pairs.training()
    validation, _, validation_info = pairs.training("validation")
    protocol, quoted = setup.protocol, {}
    if not (task.type == "qa" and protocol.qa_test_set == "markers_kept"):  # else no method reads it
        test, english_test = pairs.test()
    if task.type == "qa" and (protocol.qa_test_set == "markers_kept"
                              or protocol.qa_translate_test_gold == "english_markers"):
        # translated with the answers marked, as the official code's filter and translate-test read it
        test, _, counts = pairs.quoted_test(False, protocol.qa_test_set == "markers_kept", drop_empty=False)
        quoted = {"test_set": counts}
    report = {"task": task.name, "lang": setup.lang.code, "mt": setup.translator.name,
              "train_examples": len(targets), "validation_examples": len(validation), "test_examples": len(test),
              "seconds": time.perf_counter() - started, **info, **quoted,
              **({"validation_answer_projection": validation_info["answer_projection"]} if validation_info else {})}
    if task.parallel:  # the human English exists: how good is the MT?
        gold = setup.examples("en", "test")
        report["quality_to_english"] = {
            f: translation_quality([e[f] for e in english_test], [g[f] for g in gold]) for f in task.fields
        }
    path = Path(setup.cfg.output_dir) / "translations" / task.name / f"report-{setup.lang.code}-{setup.translator.name}.json"
    record.write_json_atomic(path, report)
    print(json.dumps(report, indent=2))
    return report


def stage1(setup: Setup) -> dict:
    """``stage=stage1``: train (or find) the stage-1 adapter of (task, model, seed, stage1.*)."""
    path = setup.ensure_stage1()
    report = {"task": setup.task.name, "model": setup.model_cfg.name, "seed": setup.seed, "stage1": str(path),
              **json.loads((path / record.STAGE1_RECORD).read_text())}
    print(f"stage 1 of {setup.task.name} {setup.model_cfg.name} seed{setup.seed}: {path}")
    return report


def train_and_test(setup: Setup, job_dir: Path | None = None) -> dict | None:
    """``stage=run`` (``stage2``: from a cached stage 1 and translations, failing at once where
    they are missing): stage 1, the method's stage 2, the test, results.json."""
    cfg, method, out = setup.cfg, setup.method, setup.out
    if job_dir is not None:
        record.write_json_atomic(job_dir / record.POINTER, {"results": str(out / record.RESULTS)})
    finished = record.finished_run(out, setup.identity, cfg.force)
    if finished is not None:
        return finished
    empty_texts = setup.check_data()
    if cfg.stage == "stage2" and (missing := setup.missing_inputs()):
        raise InputsMissing(missing)

    started, started_at = time.perf_counter(), time.time()
    _, rank = distributed.setup()
    model = setup.model()
    stage1_info = json.loads((setup.stage1_path / record.STAGE1_RECORD).read_text())
    train_stats, data_info = None, {}
    with tracker(cfg, method, out, enabled=rank == 0) as wandb_run:
        if method.trains:
            train_stats, data_info = setup.train(model, log=wandb_run.log if wandb_run is not None else None)
        test, english_test, test_info = setup.test_data()
        if rank:
            return None
        if method.trains and cfg.train.get("save_adapter", True):
            adapters.save(model, out / record.ADAPTER)
        rows, metrics, extra_metrics = setup.test(model, test, english_test, out)
        result = {
            "task": setup.task.name, "model": setup.model_cfg.name, "mt": cfg.mt.name, "method": method.label,
            "lang": setup.lang.code, "seed": cfg.seed, "experiment": cfg.experiment_name,
            "metrics": metrics, **extra_metrics, "headline_metric": setup.task.metric,
            "stage1": {"dir": str(setup.stage1_path), "train": stage1_info["train"]},
            "stage1_english": stage1_info["english_test"], "stage2_train": train_stats,
            "data": {**data_info, **test_info, **({"empty_texts": empty_texts} if empty_texts else {})},
            "timing": {"run_seconds": time.perf_counter() - started, "started_at": started_at,
                       "device": str(setup.device)},
            "git_commit": record.git_commit(), "run_id": record.config_hash(setup.identity, 8),
            "identity": setup.identity, "config": OmegaConf.to_container(cfg, resolve=True),
        }
        record.write_run(out, cfg, rows, result)
        if wandb_run is not None:
            wandb_run.log({f"test/{k}": v for k, v in metrics.items()})
            wandb_run.summary.update({f"stage1_english/{k}": v for k, v in stage1_info["english_test"].items()})
    print(record.summary_line(result))
    return result


def evaluate(setup: Setup) -> dict:
    """``stage=evaluate``: a finished run's saved stage 2 (or its stage 1, for translate-test) on
    the test set with the English of ``source``, written into ``<run>/sources/<setting>/``."""
    cfg, method, out = setup.cfg, setup.method, setup.out
    if not (out / record.RESULTS).is_file():
        raise InputsMissing(f"No finished run in {out}: run it first (the same overrides without stage=evaluate).")
    if method.trains and not (out / record.ADAPTER).is_file():
        raise InputsMissing(f"{out} holds no saved stage 2 ({record.ADAPTER}; it finished before runs saved one): "
                            "rerun it with force=true.")
    if not (setup.stage1_path / record.STAGE1_RECORD).is_file():
        raise InputsMissing(f"The stage 1 {out} was trained on is no longer in {setup.stage1_path}: rerun the run "
                            "with force=true.")
    label = record.source_label(cfg.source)
    folder = record.evaluation_dir(cfg)
    done = record.finished_evaluation(folder, out, cfg.force)
    if done is not None:
        return done
    model = setup.model()
    if method.trains:
        adapters.load(model, out / record.ADAPTER)
    fields = list(setup.task.fields)
    test, clean, _ = setup.test_data()
    english = english_source(clean, test, fields, cfg.source.mode, float(cfg.source.rate), int(cfg.source.seed))
    rows, metrics, extra = setup.test(model, test, english, folder)
    quality = {f: translation_quality([e[f] for e in english], [c[f] for c in clean]) for f in fields}
    result = {**json.loads((out / record.RESULTS).read_text()), "metrics": metrics, **extra,
              "source": {**OmegaConf.to_container(cfg.source), "label": label, "quality_to_trained_english": quality},
              "evaluated_from": str(out), "git_commit": record.git_commit()}
    record.write_run(folder, cfg, rows, result)
    print(f"{record.summary_line(result)} [source {label}]")
    return result
