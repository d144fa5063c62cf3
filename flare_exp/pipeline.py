"""One run, as a recipe: validate the combination, get (or train) stage 1, train the method's
stage 2, evaluate, write results.

    config -> data (target/English pairs) -> model (stage 1 + the method's adapter) -> train
           -> evaluate -> results.json -> tables

The pieces live in their own modules: ``methods`` (what each method does), ``stage1`` (the
cached English adapter), ``pairs`` (gold, translate-train and translate-test data),
``train`` and ``evaluate``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import distributed
from .data import Batcher
from .data.qa import SpanBatcher
from .evaluate import predict, score
from .flare.mt import load_mt_encoder
from .methods import method_for
from .models import hub_reachable, load_tokenizer, model_in_local_cache, pick_device, save_once
from .pairs import (LazyTranslator, back_translate_answers, check_data, examples, missing_translations, test_pairs,
                    training_pairs)
from .results import (POINTER, config_hash, git_commit, run_dir, run_identity, summary_line, tracker,
                      write_json_atomic, write_lines_atomic)
from .sources import english_source
from .stage1 import ensure_stage1, load_stage1, stage1_dir
from .train import Checkpoint, Validation, copy_into, train_model, trainable_weights
from .translate import build_tiny_nllb, nllb_code, translation_quality


class ConfigError(ValueError):
    """A combination of config choices that cannot run."""


class InputsMissing(ConfigError):
    """A stage-2 job whose stage 1 or translations are not there yet."""


STAGES = ("run", "translate", "stage1", "stage2", "evaluate")
ADAPTER = "adapter.safetensors"  # a run's trained stage 2, beside its results.json


def _choices(group: str) -> list[str]:
    folder = Path(__file__).resolve().parent.parent / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def validate(cfg: DictConfig) -> None:
    """Refuse, in one sentence, a combination that cannot run, before any model loads."""
    task, lang, model, mt = cfg.task, cfg.lang, cfg.model, cfg.mt
    if cfg.stage not in STAGES:
        raise ConfigError(f"Unknown stage {cfg.stage!r}; choose one of {list(STAGES)}.")
    try:
        method = method_for(cfg.method)
        method.check(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.source.mode != "as_trained" and cfg.stage != "evaluate":
        raise ConfigError(f"source.mode={cfg.source.mode} re-evaluates a finished run: add stage=evaluate.")
    if cfg.stage == "evaluate" and not method.reads_english_test:
        raise ConfigError(f"Method {method.name} reads no English at test: stage=evaluate with another source "
                          "applies to flare, input_fusion, xmixup and translate_test.")
    if lang.code not in task.languages:
        raise ConfigError(f"Task {task.name} has no language {lang.code!r}; choose lang from {list(task.languages)}.")
    if task.type not in ("classification", "qa"):
        raise ConfigError(f"Unknown task type {task.type!r} (classification or qa).")
    translates = method.reads_english_test or method.trains
    if mt.name == "gold" and not task.parallel and translates:
        raise ConfigError(
            f"Task {task.name} is not parallel, so method {method.name} needs machine translation: "
            f"choose mt from {[m for m in _choices('mt') if m != 'gold']}."
        )
    if model.kind not in ("encoder", "decoder", "encoder_decoder"):
        raise ConfigError(f"Model {model.name} of kind {model.kind!r} cannot run yet; choose model from "
                          f"{_choices('model')}.")
    expected_format = "head" if model.kind == "encoder" else "plain"
    if model.get("prompt_format", expected_format) != expected_format:
        raise ConfigError(f"Model {model.name} ({model.kind}) supports prompt_format={expected_format} only.")
    hub_model = model.source == "hub" and not model_in_local_cache(model.path)
    hub_data = not task.local and not cfg.data.dir
    mt_models = [mt.get("model")] if translates and mt.get("model") else []
    if method.needs_mt_encoder and method.cfg.encoder != "tiny":
        mt_models.append(method.cfg.encoder)
    hub_mt = [m for m in mt_models if not model_in_local_cache(m)]
    if (hub_model or hub_data or hub_mt) and not hub_reachable():
        needs = [f"model {model.path}"] * hub_model + [f"task {task.name} data"] * hub_data
        needs += [f"MT model {m}" for m in hub_mt]
        raise ConfigError(
            f"The Hugging Face hub cannot be reached and this run needs it ({', '.join(needs)}): "
            "run the offline demo with `python run.py experiment=demo` (make run), or point "
            "data.dir at a local data directory and use an offline model (minilm, smollm2-135m) "
            "with mt=gold."
        )


def translate_stage(cfg: DictConfig) -> dict:
    """``stage=translate``: fill the translation cache of (task, lang) and report on it."""
    if cfg.mt.name == "gold":
        raise ConfigError("stage=translate needs an MT system: choose mt from "
                          f"{[m for m in _choices('mt') if m != 'gold']}.")
    translator = LazyTranslator(cfg, pick_device(cfg.device))
    started = time.perf_counter()
    targets, _, info = training_pairs(cfg, translator)
    validation, _, validation_info = training_pairs(cfg, translator, "validation")
    test, english_test = test_pairs(cfg, translator)
    report = {"task": cfg.task.name, "lang": cfg.lang.code, "mt": translator.name,
              "train_examples": len(targets), "validation_examples": len(validation), "test_examples": len(test),
              "seconds": time.perf_counter() - started, **info,
              **({"validation_answer_projection": validation_info["answer_projection"]} if validation_info else {})}
    if cfg.task.parallel:  # the human English exists: how good is the MT?
        gold = examples(cfg, "en", "test")
        report["quality_to_english"] = {
            f: translation_quality([e[f] for e in english_test], [g[f] for g in gold]) for f in cfg.task.fields
        }
    path = Path(cfg.output_dir) / "translations" / cfg.task.name / f"report-{cfg.lang.code}-{translator.name}.json"
    write_json_atomic(path, report)
    print(json.dumps(report, indent=2))
    return report


def stage1_stage(cfg: DictConfig) -> dict:
    """``stage=stage1``: train (or find) the stage-1 adapter of (task, model, seed, stage1.*)."""
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, Path(cfg.output_dir) / "cache")
    path = ensure_stage1(cfg, tokenizer, make_batcher(cfg, tokenizer, plain=True), device)
    report = {"task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed, "stage1": str(path),
              **json.loads((path / "stage1.json").read_text())}
    print(f"stage 1 of {cfg.task.name} {cfg.model.name} seed{cfg.seed}: {path}")
    return report


def source_label(cfg: DictConfig) -> str:
    source = cfg.source
    return source.mode + (f"-{source.rate:g}" if source.mode == "noised" else "") + (
        f"-seed{source.seed}" if source.mode in ("noised", "mismatched") else "")


def evaluate_stage(cfg: DictConfig) -> dict:
    """``stage=evaluate``: a finished run's saved stage 2 (or its stage 1, for translate-test) on
    the test set with the English of ``source``, written into ``<run>/sources/<setting>/``."""
    method, out = method_for(cfg.method), run_dir(cfg)
    if not (out / "results.json").is_file():
        raise InputsMissing(f"No finished run in {out}: run it first (the same overrides without stage=evaluate).")
    if method.trains and not (out / ADAPTER).is_file():
        raise InputsMissing(f"{out} holds no saved stage 2 ({ADAPTER}; it finished before runs saved one): "
                            "rerun it with force=true.")
    folder = out / "sources" / source_label(cfg)
    done = _evaluated(folder, out, cfg.force)
    if done is not None:
        return done
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, Path(cfg.output_dir) / "cache")
    translator = LazyTranslator(cfg, device) if cfg.mt.name != "gold" else None
    model = load_stage1(cfg, stage1_dir(cfg), tokenizer, device)
    mt = _mt_encoder(cfg, method, device) if method.needs_mt_encoder else None
    batcher = make_batcher(cfg, tokenizer, mt_tokenizer=mt[1] if mt else None)
    if method.trains:
        model = method.build(cfg, model, (mt[0], mt[2]) if mt else None)
        load_adapter(model, out)
    fields = list(cfg.task.fields)
    test, clean = test_pairs(cfg, translator)
    english = english_source(clean, test, fields, cfg.source.mode, float(cfg.source.rate), int(cfg.source.seed))
    rows, metrics, extra = _test(cfg, method, model, batcher, test, english, translator, folder, device)
    result = {**json.loads((out / "results.json").read_text()), "metrics": metrics, **extra,
              "source": {**OmegaConf.to_container(cfg.source), "label": source_label(cfg),
                         "quality_to_trained_english": {f: translation_quality([e[f] for e in english],
                                                                               [c[f] for c in clean]) for f in fields}},
              "evaluated_from": str(out), "git_commit": git_commit()}
    _write(folder, cfg, rows, result)
    print(f"{summary_line(result)} [source {source_label(cfg)}]")
    return result


def require_inputs(cfg: DictConfig, method) -> None:
    """``stage=stage2``: the cached stage 1 and every translation the run reads must be there;
    otherwise it fails at once (before any model loads), naming the stage to run."""
    final = stage1_dir(cfg)
    if not (final / "stage1.json").is_file():
        raise InputsMissing(f"Stage 1 of {cfg.task.name} {cfg.model.name} seed {cfg.seed} is not in {final}: "
                            "run stage=stage1 first (python -m flare_exp.sweep chains the stages).")
    if cfg.mt.name == "gold":
        return
    translator = LazyTranslator(cfg, "cpu")
    needs = [("train", "en-x"), ("validation", "en-x")] * method.trains + [("test", "x-en")] * method.reads_english_test
    for split, direction in needs:
        missing = missing_translations(cfg, split, direction, translator)
        if missing:
            raise InputsMissing(f"{missing} {direction} translations of {cfg.task.name} {split} ({cfg.lang.code}) are "
                                "not in the cache: run stage=translate first (python -m flare_exp.sweep chains the "
                                "stages).")


def make_batcher(cfg: DictConfig, tokenizer, mt_tokenizer=None, plain: bool = False):
    """The batcher of this run's method (``plain``: of stage 1, whatever the method)."""
    factor = 1 if plain else method_for(cfg.method).length_factor
    max_length = int(cfg.task.max_length * factor)
    mt_lang = nllb_code(cfg.lang) if mt_tokenizer is not None else None
    if cfg.task.type == "qa" and cfg.model.kind == "encoder":
        return SpanBatcher(tokenizer, max_length, stride=cfg.task.get("stride", 128), mt_tokenizer=mt_tokenizer,
                           mt_lang=mt_lang)
    return Batcher(tokenizer, cfg.task, cfg.model.kind, max_length, mt_tokenizer=mt_tokenizer, mt_lang=mt_lang)


def _mt_encoder(cfg: DictConfig, method, device):
    """(encoder, tokenizer, width) of FLARE MT's MT model; ``tiny`` builds a random one offline."""
    path = method.cfg.encoder
    if path == "tiny":
        path = str(save_once(Path(cfg.output_dir) / "cache" / "models" / "tiny-nllb", build_tiny_nllb))
    return load_mt_encoder(path, device)


# -- one run -------------------------------------------------------------------------------
def run(cfg: DictConfig, job_dir: Path | None = None) -> dict | None:
    """Run one (task, model, method, lang, seed) and return its results record."""
    validate(cfg)
    if cfg.stage == "translate":
        return translate_stage(cfg)
    if cfg.stage == "stage1":
        return stage1_stage(cfg)
    if cfg.stage == "evaluate":
        return evaluate_stage(cfg)
    out, identity = run_dir(cfg), run_identity(cfg)
    if job_dir is not None:
        write_json_atomic(job_dir / POINTER, {"results": str(out / "results.json")})
    finished = _finished(out, identity, cfg.force)
    if finished is not None:
        return finished
    method = method_for(cfg.method)
    empty_texts = check_data(cfg, method.trains)
    if cfg.stage == "stage2":
        require_inputs(cfg, method)

    started, started_at = time.perf_counter(), time.time()
    _, rank = distributed.setup()
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, Path(cfg.output_dir) / "cache")
    translator = LazyTranslator(cfg, device) if cfg.mt.name != "gold" else None
    stage1_path = ensure_stage1(cfg, tokenizer, make_batcher(cfg, tokenizer, plain=True), device)
    model = load_stage1(cfg, stage1_path, tokenizer, device)
    mt = _mt_encoder(cfg, method, device) if method.needs_mt_encoder else None
    batcher = make_batcher(cfg, tokenizer, mt_tokenizer=mt[1] if mt else None)
    fields, train_stats, data_info = list(cfg.task.fields), None, {}
    with tracker(cfg, out, enabled=rank == 0) as wandb_run:
        if method.trains:
            targets, english, data_info = training_pairs(cfg, translator)
            inputs, english = method.inputs(targets, english, fields, batcher.qa)
            model = method.build(cfg, model, (mt[0], mt[2]) if mt else None)
            train_stats = train_model(model, batcher, inputs, english, cfg.train, cfg.seed, device,
                                      desc=f"stage 2 {method.label} {cfg.lang.code}",
                                      checkpoint=Checkpoint(out / "checkpoint", int(cfg.train.checkpoint_every)),
                                      validation=_validation(cfg, method, model, batcher, translator, device),
                                      log=wandb_run.log if wandb_run is not None else None)
        test, english_test = test_pairs(cfg, translator, english=method.reads_english_test)
        if rank:
            return None
        if method.trains and cfg.train.get("save_adapter", True):
            save_adapter(model, out)
        rows, metrics, extra_metrics = _test(cfg, method, model, batcher, test, english_test, translator, out, device)
        stage1_info = json.loads((stage1_path / "stage1.json").read_text())
        result = {
            "task": cfg.task.name, "model": cfg.model.name, "mt": cfg.mt.name, "method": method.label,
            "lang": cfg.lang.code, "seed": cfg.seed, "experiment": cfg.experiment_name,
            "metrics": metrics, **extra_metrics, "headline_metric": cfg.task.metric,
            "stage1": {"dir": str(stage1_path), "train": stage1_info["train"]},
            "stage1_english": stage1_info["english_test"], "stage2_train": train_stats,
            "data": {**data_info, **({"empty_texts": empty_texts} if empty_texts else {})},
            "timing": {"run_seconds": time.perf_counter() - started, "started_at": started_at, "device": str(device)},
            "git_commit": git_commit(), "run_id": config_hash(identity, 8), "identity": identity,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        _write(out, cfg, rows, result)
        if wandb_run is not None:
            wandb_run.log({f"test/{k}": v for k, v in metrics.items()})
            wandb_run.summary.update({f"stage1_english/{k}": v for k, v in stage1_info["english_test"].items()})
    print(summary_line(result))
    return result


def _test(cfg: DictConfig, method, model, batcher, test, english_test, translator, out: Path, device):
    """(prediction rows, metrics, further labelled metrics) on the test set."""
    inputs, english = method.inputs(test, english_test, list(cfg.task.fields), batcher.qa)
    rows = predict(model, batcher, inputs, english, cfg.train.eval_batch_size, device,
                   cfg.task.max_new_tokens, desc=f"test {method.label} {cfg.lang.code}",
                   precision=cfg.train.get("autocast"))
    for row, target in zip(rows, test):
        row["id"] = target["id"]
    extra = {}
    if batcher.qa and method.test_input == "english" and translator is not None:
        # Both are reported: the English answers as they are (the paper's translate-test),
        # and translated back into the target language (the headline metrics).
        extra["metrics_without_back_translation"] = score(rows, batcher)
        back_translate_answers(cfg, rows, translator, out)
    return rows, score(rows, batcher), extra


def _validation(cfg: DictConfig, method, model, batcher, translator, device) -> Validation | None:
    """Model selection on the target validation data (human under ``mt=gold``, else translated
    like the training data), scored by the task's metric; None with ``train.eval_every=0``."""
    if cfg.train.get("eval_every") == 0:
        return None
    targets, english, _ = training_pairs(cfg, translator, split="validation")
    inputs, english = method.inputs(targets, english, list(cfg.task.fields), batcher.qa)

    def validate() -> float:
        rows = predict(model, batcher, inputs, english, cfg.train.eval_batch_size, device,
                       cfg.task.max_new_tokens, desc=f"validation {method.label} {cfg.lang.code}",
                       precision=cfg.train.get("autocast"))
        return score(rows, batcher)[cfg.task.metric]

    return Validation(validate, cfg.train.get("eval_every"), cfg.task.get("select", "best"))


def _finished(out: Path, identity: dict, force: bool, quiet: bool = False) -> dict | None:
    """The record of this run if it finished earlier with the same identity (and not ``force``)."""
    path = out / "results.json"
    if force or not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("identity") != identity:
        raise ConfigError(f"{out} holds a run of other settings: move it away, or rerun it with force=true.")
    if not quiet:
        print(f"[skipped: finished earlier with these settings, force=true reruns it] {summary_line(result)}")
    return result


def _evaluated(folder: Path, out: Path, force: bool, quiet: bool = False) -> dict | None:
    """The evaluation in ``folder`` if it is of the run now in ``out`` (not of an earlier training
    of it) and not ``force``."""
    path = folder / "results.json"
    if force or not path.is_file() or not (out / "results.json").is_file():
        return None
    result, trained = json.loads(path.read_text()), json.loads((out / "results.json").read_text())
    if (result.get("run_id"), result.get("timing")) != (trained.get("run_id"), trained.get("timing")):
        return None
    if not quiet:
        print(f"[skipped: evaluated earlier, force=true evaluates it again] {summary_line(result)} "
              f"[source {folder.name}]")
    return result


def finished(cfg: DictConfig) -> bool:
    """Whether this job would find its work done and skip it (``force`` unset): a run's or an
    evaluation's results of these settings, a stage 1 in the cache. A SLURM sweep submits only
    the other jobs, and a run folder holding other settings stops it before it submits any.
    (Translation jobs count as never done: one whose cache is complete reads it and ends without
    loading the MT model.)"""
    if cfg.force or cfg.stage == "translate":
        return False
    if cfg.stage == "stage1":
        return (stage1_dir(cfg) / "stage1.json").is_file()
    out = run_dir(cfg)
    if cfg.stage == "evaluate":
        return _evaluated(out / "sources" / source_label(cfg), out, force=False, quiet=True) is not None
    return _finished(out, run_identity(cfg), force=False, quiet=True) is not None


def save_adapter(model, out: Path) -> None:
    """The trained stage 2 (every trainable parameter, the selected step's) as safetensors in the
    run directory, so that it can be evaluated again without retraining."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{ADAPTER}.writing"
    save_file(trainable_weights(model), str(staging))
    staging.replace(out / ADAPTER)


def load_adapter(model, out: Path) -> None:
    """Put a run's saved stage 2 into ``model`` (the same method built on the same stage 1)."""
    from safetensors.torch import load_file

    weights = load_file(str(out / ADAPTER))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(f"{out / ADAPTER} does not hold this method's trainable parameters.")
    copy_into(model, weights)


def _write(out: Path, cfg: DictConfig, rows: list[dict], result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_lines_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "results.json", result)  # last: its presence marks the run finished
