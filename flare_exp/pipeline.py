"""One run: validate the combination, get (or train) stage 1, run the method, write results.

    config -> data (target/English pairs) -> model (base + adapters) -> train -> evaluate -> results.json
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model

from . import distributed
from .data import Batcher, load_examples
from .data.qa import SpanBatcher
from .data.collate import concatenate_inputs
from .flare import FlareConfig, get_flare_model
from .flare.mt import FlareMTModel, load_mt_encoder
from .models import hub_reachable, load_base_model, load_tokenizer, model_in_local_cache, pick_device, save_once
from .results import (POINTER, config_hash, git_commit, method_label, run_dir, run_identity, summary_line,
                      tracker, write_json_atomic, write_lines_atomic)
from .train import Checkpoint, predict, score, train_model
from .translate import (FakeTranslator, NLLBTranslator, build_tiny_nllb, cache_file, nllb_code, project_qa,
                        translate_examples, translation_quality)
from .xmixup import XMixupModel

STAGE2_ADAPTER = "stage2"


class ConfigError(ValueError):
    """A combination of config choices that cannot run."""


def _choices(group: str) -> list[str]:
    folder = Path(__file__).resolve().parent.parent / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def english_in_forward(method: DictConfig) -> bool:
    """FLARE and X-Mixup run the English source through the model's forward."""
    return method.stage2 in ("flare", "xmixup")


def reads_english_test(method: DictConfig) -> bool:
    """The method needs the English version of the test set, in its forward or as its input."""
    return english_in_forward(method) or method.eval_input in ("english", "fused")


def validate(cfg: DictConfig) -> None:
    """Refuse, in one sentence, a combination that cannot run, before any model loads."""
    task, lang, method, model, mt = cfg.task, cfg.lang, cfg.method, cfg.model, cfg.mt
    if lang.code not in task.languages:
        raise ConfigError(f"Task {task.name} has no language {lang.code!r}; choose lang from {list(task.languages)}.")
    if task.type not in ("classification", "qa"):
        raise ConfigError(f"Unknown task type {task.type!r} (classification or qa).")
    translates = reads_english_test(method) or method.stage2 != "none"
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
    if method.stage2 == "flare_mt" and method.encoder != "tiny":
        mt_models.append(method.encoder)
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


# -- data ----------------------------------------------------------------------------------
def _examples(cfg: DictConfig, lang: str, split: str) -> list[dict]:
    rows = load_examples(cfg.task.name, lang, split, cfg.data.dir)
    cap = cfg.data.max_train if split == "train" else cfg.data.max_test if split == "test" else None
    return rows[: int(cap)] if cap else rows


def _paired(cfg: DictConfig, lang: str, split: str) -> tuple[list[dict], list[dict]]:
    """Target examples and their human English versions (parallel data, ``mt=gold``)."""
    target, english = _examples(cfg, lang, split), _examples(cfg, "en", split)
    if len(target) != len(english) or any(t["label"] != e["label"] for t, e in zip(target, english)):
        raise ConfigError(f"{cfg.task.name} {split} data in {lang} is not parallel to the English data.")
    return target, english


class LazyTranslator:
    """The configured MT system, loaded only when the cache lacks a translation."""

    def __init__(self, cfg: DictConfig, device):
        self.cfg, self.device, self._impl = cfg, device, None
        mt = cfg.mt
        self.name = mt.name if mt.name == "fake" else f"{mt.name}-beams{mt.beams}-len{mt.max_length}"

    def translate(self, texts, src, tgt):
        if self._impl is None:
            mt = self.cfg.mt
            self._impl = FakeTranslator() if mt.name == "fake" else NLLBTranslator(
                mt.model, beams=mt.beams, max_length=mt.max_length, batch_size=mt.batch_size, device=self.device)
        return self._impl.translate(texts, src, tgt)


def _cache(cfg: DictConfig, split: str, direction: str, translator) -> Path:
    return cache_file(Path(cfg.output_dir) / "translations", cfg.task.name, split, direction, cfg.lang.code,
                      translator.name)


def training_pairs(cfg: DictConfig, translator) -> tuple[list[dict], list[dict], dict]:
    """Stage-2 training data: target-language examples and their English versions.

    ``mt=gold``: the human target side of a parallel dataset. Otherwise translate-train: the
    English training set translated into the target language (QA answers carried through the
    translation by markers; examples whose markers are lost or duplicated are dropped).
    """
    if cfg.mt.name == "gold":
        targets, english = _paired(cfg, cfg.lang.code, "train")
        return targets, english, {}
    english = _examples(cfg, "en", "train")
    src, tgt = "eng_Latn", nllb_code(cfg.lang)
    path = _cache(cfg, "train", "en-x", translator)
    if cfg.task.type == "qa":
        targets, counts = project_qa(english, translator, src, tgt, path, cfg.mt.batch_size,
                                     desc=f"translate-train en->{cfg.lang.code}")
        by_id = {ex["id"]: ex for ex in english}
        return targets, [by_id[t["id"]] for t in targets], {"answer_projection": counts}
    fields = list(cfg.task.fields)
    translated = translate_examples(english, fields, src, tgt, translator, path, cfg.mt.batch_size,
                                    desc=f"translate-train en->{cfg.lang.code}")
    return [{**ex, **t} for ex, t in zip(english, translated)], english, {}


def test_pairs(cfg: DictConfig, translator, english: bool = True) -> tuple[list[dict], list[dict] | None]:
    """The target test set and its English version (human under ``mt=gold``, else
    translate-test), or None where ``english`` is not needed."""
    if cfg.mt.name == "gold":
        return _paired(cfg, cfg.lang.code, "test")
    test = _examples(cfg, cfg.lang.code, "test")
    if not english:
        return test, None
    translated = translate_examples(test, list(cfg.task.fields), nllb_code(cfg.lang), "eng_Latn", translator,
                                    _cache(cfg, "test", "x-en", translator), cfg.mt.batch_size,
                                    desc=f"translate-test {cfg.lang.code}->en")
    return test, [{**ex, **t} for ex, t in zip(test, translated)]


def translate_stage(cfg: DictConfig) -> dict:
    """``stage=translate``: fill the translation cache of (task, lang) and report on it."""
    if cfg.mt.name == "gold":
        raise ConfigError("stage=translate needs an MT system: choose mt from "
                          f"{[m for m in _choices('mt') if m != 'gold']}.")
    translator = LazyTranslator(cfg, pick_device(cfg.device))
    started = time.perf_counter()
    targets, _, info = training_pairs(cfg, translator)
    test, english_test = test_pairs(cfg, translator)
    report = {"task": cfg.task.name, "lang": cfg.lang.code, "mt": translator.name,
              "train_examples": len(targets), "test_examples": len(test),
              "seconds": time.perf_counter() - started, **info}
    if cfg.task.parallel:  # the human English exists: how good is the MT?
        gold = _examples(cfg, "en", "test")
        report["quality_to_english"] = {
            f: translation_quality([e[f] for e in english_test], [g[f] for g in gold]) for f in cfg.task.fields
        }
    path = Path(cfg.output_dir) / "translations" / cfg.task.name / f"report-{cfg.lang.code}-{translator.name}.json"
    write_json_atomic(path, report)
    print(json.dumps(report, indent=2))
    return report


def make_batcher(cfg: DictConfig, tokenizer, mt_tokenizer=None, plain: bool = False):
    """The batcher of this run's method (``plain``: of stage 1, whatever the method)."""
    method = OmegaConf.create({}) if plain else cfg.method
    max_length = int(cfg.task.max_length * method.get("length_factor", 1))
    mt_lang = nllb_code(cfg.lang) if mt_tokenizer is not None else None
    if cfg.task.type == "qa" and cfg.model.kind == "encoder":
        return SpanBatcher(tokenizer, max_length, stride=cfg.task.get("stride", 128), mt_tokenizer=mt_tokenizer,
                           mt_lang=mt_lang)
    return Batcher(tokenizer, cfg.task, cfg.model.kind, max_length, mt_tokenizer=mt_tokenizer, mt_lang=mt_lang)


# -- stage 1 -------------------------------------------------------------------------------
def stage1_key(cfg: DictConfig) -> str:
    identity = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "seed": cfg.seed,
        "data": {"dir": str(cfg.data.dir) if cfg.data.dir else None, "max_train": cfg.data.max_train},
    }
    return config_hash(identity, 12)


def stage1_dir(cfg: DictConfig) -> Path:
    return (Path(cfg.output_dir) / "stage1" / cfg.task.name / cfg.model.name
            / f"seed{cfg.seed}-{stage1_key(cfg)}")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lora_config(cfg: DictConfig, modules_to_save=None) -> LoraConfig:
    targets = cfg.model.lora_targets
    return LoraConfig(r=cfg.train.r, lora_alpha=cfg.train.alpha, lora_dropout=cfg.train.dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      modules_to_save=modules_to_save)


def ensure_stage1(cfg: DictConfig, tokenizer, batcher, device) -> Path:
    """The stage-1 adapter directory, trained now unless cached.

    Concurrent jobs wait on a file lock, so exactly one trains; the adapter is written to a
    staging folder and renamed into place, so no reader sees half of it. Under data parallel,
    rank 0 holds the lock and decides, every rank trains, rank 0 writes.
    """
    final = stage1_dir(cfg)
    world, rank = distributed.world()
    lock = _file_lock(final.with_name(final.name + ".lock")) if rank == 0 else contextlib.nullcontext()
    with lock:
        if distributed.broadcast((final / "stage1.json").is_file()):
            return final
        if rank == 0:
            print(f"Training stage 1 -> {final}", flush=True)
        english_train = _examples(cfg, "en", "train")
        base = _load_base(cfg, tokenizer, device)
        head = None
        if cfg.model.kind == "encoder":
            head = ["qa_outputs"] if cfg.task.type == "qa" else ["classifier"]
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, _lora_config(cfg, head))
        resume = Checkpoint(final.with_name(f".{final.name}.checkpoint"), int(cfg.train.checkpoint_every))
        stats = train_model(model, batcher, english_train, None, cfg.train, cfg.seed, device,
                            desc=f"stage 1 {cfg.task.name} en", checkpoint=resume)
        if rank == 0:
            english_test = _examples(cfg, "en", "test")
            rows = predict(model, batcher, english_test, None, cfg.train.eval_batch_size, device,
                           cfg.task.max_new_tokens, desc="stage 1 English test")
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            model.save_pretrained(staging)  # safetensors
            write_json_atomic(staging / "stage1.json", {"train": stats, "english_test": score(rows, batcher),
                                                        "key": stage1_key(cfg)})
            if final.exists():  # a broken earlier attempt: no stage1.json inside
                shutil.rmtree(final)
            staging.rename(final)
        distributed.barrier()
        return final


def _load_base(cfg: DictConfig, tokenizer, device):
    labels = list(cfg.task.labels) if cfg.task.labels else None
    return load_base_model(cfg.model, tokenizer, labels, device, Path(cfg.output_dir) / "cache", cfg.seed)


def load_stage1(cfg: DictConfig, path: Path, tokenizer, device) -> PeftModel:
    base = _load_base(cfg, tokenizer, device)
    model = PeftModel.from_pretrained(base, path)  # loads adapter_model.safetensors
    model.eval()
    return model


def _flare_config(cfg: DictConfig) -> FlareConfig:
    method, targets = cfg.method, cfg.model.lora_targets
    return FlareConfig(
        r=cfg.train.r, alpha=cfg.train.alpha, dropout=cfg.train.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fuse_modules=cfg.model.fuse_modules, fusion=method.fusion, heads=method.heads,
        alignment=method.alignment, mask_source_padding=method.mask_source_padding,
    )


def _lora_stage2(cfg: DictConfig, stage1: PeftModel):
    if cfg.model.quantization == "nf4":
        # Merging would re-quantise 4-bit weights: keep stage 1 as a frozen adapter.
        stage1.add_adapter(STAGE2_ADAPTER, _lora_config(cfg))
        stage1.base_model.set_adapter([STAGE2_ADAPTER, stage1.active_adapter])
        for name, param in stage1.named_parameters():
            param.requires_grad_(f".{STAGE2_ADAPTER}." in name)
        return stage1
    return get_peft_model(stage1.merge_and_unload(), _lora_config(cfg), adapter_name=STAGE2_ADAPTER)


def _hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.d_model


def build_stage2(cfg: DictConfig, stage1: PeftModel, mt_encoder=None):
    """A fresh stage-2 adapter on the stage-1 model: plain LoRA (lora, input_fusion), FLARE,
    FLARE MT (with ``mt_encoder`` = (encoder, width)), or LoRA with X-Mixup."""
    torch.manual_seed(cfg.seed)
    kind = cfg.method.stage2
    if kind == "flare":
        return get_flare_model(stage1, _flare_config(cfg))
    if kind == "flare_mt":
        flare = get_flare_model(stage1, _flare_config(cfg))
        encoder, width = mt_encoder
        return FlareMTModel(flare, encoder, width, _hidden_size(flare.hf_model))
    model = _lora_stage2(cfg, stage1)
    if kind == "xmixup":
        method = cfg.method
        return XMixupModel(model, STAGE2_ADAPTER, layers=method.layers, lambda0=method.lambda0, heads=method.heads)
    return model


def _mt_encoder(cfg: DictConfig, device):
    """(encoder, tokenizer, width) of FLARE MT's MT model; ``tiny`` builds a random one offline."""
    path = cfg.method.encoder
    if path == "tiny":
        path = str(save_once(Path(cfg.output_dir) / "cache" / "models" / "tiny-nllb", build_tiny_nllb))
    return load_mt_encoder(path, device)


def _back_translate_answers(cfg: DictConfig, rows: list[dict], translator, out: Path) -> None:
    """Translate-test QA answers are English spans: translate them into the target language,
    which the gold answers are in (the English answer stays in ``output``)."""
    answers = [{"id": r["id"], "answer": r["prediction"] or ""} for r in rows]
    translated = translate_examples(answers, ["answer"], "eng_Latn", nllb_code(cfg.lang), translator,
                                    out / "answers-en-x" / f"{translator.name}.jsonl", cfg.mt.batch_size,
                                    desc="translate answers back")
    for row, fields in zip(rows, translated):
        row["output"], row["prediction"] = row["prediction"], fields["answer"]


# -- one run -------------------------------------------------------------------------------
def run(cfg: DictConfig, job_dir: Path | None = None) -> dict | None:
    """Run one (task, model, method, lang, seed) and return its results record."""
    validate(cfg)
    if cfg.stage == "translate":
        return translate_stage(cfg)
    out = run_dir(cfg)
    results_path = out / "results.json"
    if job_dir is not None:
        write_json_atomic(job_dir / POINTER, {"results": str(results_path)})
    identity = run_identity(cfg)
    if results_path.is_file() and not cfg.force:
        result = json.loads(results_path.read_text())
        if result.get("identity") != identity:
            raise ConfigError(f"{out} holds a run of other settings: move it away, or rerun it with force=true.")
        print(f"[skipped: finished earlier with these settings, force=true reruns it] {summary_line(result)}")
        return result

    started = time.perf_counter()
    _, rank = distributed.setup()
    device = pick_device(cfg.device)
    cache = Path(cfg.output_dir) / "cache"
    tokenizer = load_tokenizer(cfg.model, cache)
    method = cfg.method
    translator = LazyTranslator(cfg, device) if cfg.mt.name != "gold" else None
    stage1_path = ensure_stage1(cfg, tokenizer, make_batcher(cfg, tokenizer, plain=True), device)
    stage1_info = json.loads((stage1_path / "stage1.json").read_text())
    model = load_stage1(cfg, stage1_path, tokenizer, device)
    mt = _mt_encoder(cfg, device) if method.stage2 == "flare_mt" else None
    batcher = make_batcher(cfg, tokenizer, mt_tokenizer=mt[1] if mt else None)
    uses_english = english_in_forward(method)
    fields, train_stats, data_info = list(cfg.task.fields), None, {}
    with tracker(cfg, out, enabled=rank == 0) as wandb_run:
        if method.stage2 != "none":
            targets, english, data_info = training_pairs(cfg, translator)
            if method.eval_input == "fused":
                targets = concatenate_inputs(targets, english, fields, batcher.qa)
            model = build_stage2(cfg, model, (mt[0], mt[2]) if mt else None)
            train_stats = train_model(model, batcher, targets, english if uses_english else None, cfg.train,
                                      cfg.seed, device, desc=f"stage 2 {method_label(method)} {cfg.lang.code}",
                                      checkpoint=Checkpoint(out / "checkpoint", int(cfg.train.checkpoint_every)))
        test, english_test = test_pairs(cfg, translator, english=reads_english_test(method))
        if rank:
            return None
        inputs = {"target": test, "english": english_test}.get(method.eval_input)
        if method.eval_input == "fused":
            inputs = concatenate_inputs(test, english_test, fields, batcher.qa)
        rows = predict(model, batcher, inputs, english_test if uses_english else None, cfg.train.eval_batch_size,
                       device, cfg.task.max_new_tokens, desc=f"test {method_label(method)} {cfg.lang.code}")
        for row, target in zip(rows, test):
            row["id"] = target["id"]
        if batcher.qa and method.eval_input == "english" and translator is not None:
            _back_translate_answers(cfg, rows, translator, out)
        metrics = score(rows, batcher)
        result = {
            "task": cfg.task.name, "model": cfg.model.name, "mt": cfg.mt.name, "method": method_label(method),
            "lang": cfg.lang.code, "seed": cfg.seed, "experiment": cfg.experiment_name,
            "metrics": metrics, "headline_metric": cfg.task.metric,
            "stage1": {"dir": str(stage1_path), "train": stage1_info["train"]},
            "stage1_english": stage1_info["english_test"],
            "stage2_train": train_stats, "data": data_info,
            "timing": {"run_seconds": time.perf_counter() - started, "device": str(device)},
            "git_commit": git_commit(),
            "run_id": config_hash(identity, 8), "identity": identity,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_lines_atomic(out / "predictions.jsonl", rows)
        write_json_atomic(results_path, result)  # last: its presence marks the run finished
        if wandb_run is not None:
            wandb_run.log({f"test/{k}": v for k, v in metrics.items()})
    print(summary_line(result))
    return result
