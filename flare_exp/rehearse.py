"""A paper table's jobs rehearsed on a CPU before a GPU is spent:

    python -m flare_exp.rehearse experiment=paper_xnli [--longest-from DIR] [--work DIR] [overrides]
    make rehearse-xnli    (rehearse-nusax, rehearse-tydiqa)

Every job class of the table (model x method; the languages taken in turn, so that each
appears) goes through the stages a SLURM sweep chains, by the code the real job runs
(``flare_exp.stages.run``): the translation of every language of the table, stage 1 of every
model, then each class's stage 2 for a few optimizer steps (a resumable checkpoint included),
its validation and an evaluation batch. What is real: the job's config as the sweep composes it
(memory remedy included: gradient checkpointing, micro-batches and accumulation), its dtype,
4-bit quantization, autocast, attention and optimizer; the task's lengths with the method's
length factor; the data through the hub loading code from copies laid out as the hub
repositories are (``flare_exp.data.replicas``), holding the longest inputs of each language
(``--longest-from``: the longest examples of a local data directory; else generated text in
each language's script, longer than any limit); each model's published architecture with its
layers and widths shrunk, and its tokenizer or a stand-in (``flare_exp.stand_ins``). What is not:
the weights (random), the device (the CPU; the MT models run in bf16 as on a GPU), the batch
(micro-batches of at most 2, accumulation of at most 2), the step count, and the translations'
text (the NLLB stand-in runs every batch at the real length; its output, noise, is replaced by
the source with the target's code, so QA answers keep their markers as NLLB keeps most of them).

It prints a table (job class, stage, ok or the one-sentence reason, seconds), writes it to
``<work>/rehearsal.csv`` with each failure's traceback in ``<work>/logs/``, and exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

STEPS = 2          # optimizer steps of each training stage
MICRO_BATCH = 2    # at most, per forward
ACCUMULATION = 2   # at most
ROWS = {"train": 8, "validation": 4, "test": 4}  # examples of each (language, split) in the copies
GPU_DTYPE = "bfloat16"  # the MT models' dtype on a GPU (``auto``), used here too
MARK = ".rehearsal"  # the work folder's mark: only a folder holding it is emptied


@dataclass
class Outcome:
    stage: str
    model: str
    method: str
    lang: str
    result: str  # "ok", or the one-sentence reason
    seconds: float


# -- the data -------------------------------------------------------------------------------
SCRIPTS = {"ar": (0x0627, 0x064A), "ur": (0x0627, 0x064A), "bn": (0x0985, 0x09B9), "te": (0x0C05, 0x0C39),
           "hi": (0x0905, 0x0939), "ko": (0xAC00, 0xD7A3), "ru": (0x0430, 0x044F), "bg": (0x0430, 0x044F),
           "el": (0x03B1, 0x03C9), "th": (0x0E01, 0x0E2E), "zh": (0x4E00, 0x9FA5)}
WITHOUT_SPACES = {"th", "zh"}
LATIN = "abcdefghijklmnopqrstuvwxyzéèàçñüöäığş"


def _letters(lang: str) -> str:
    if lang in SCRIPTS:
        first, last = SCRIPTS[lang]
        return "".join(chr(c) for c in range(first, last + 1))
    return LATIN


def _text(lang: str, characters: int, rng: random.Random) -> str:
    letters, words = _letters(lang), []
    while sum(len(w) + 1 for w in words) < characters:
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return ("" if lang in WITHOUT_SPACES else " ").join(words)[:characters]


def generated_rows(task: DictConfig, langs: list[str]) -> dict[tuple[str, str], list[dict]]:
    """Examples in each language's script, every other one longer than any length limit (QA:
    the answer near the end of a long context), parallel across languages where the task is."""
    rows = {}
    for lang in ["en", *langs]:
        for split, n in ROWS.items():
            rng = random.Random(f"{lang}-{split}")
            examples = []
            for i in range(n):
                long = i % 2 == 0
                if task.type == "qa":
                    answer = _text(lang, 12, rng)
                    before = _text(lang, 6000 if long else 200, rng)
                    after = _text(lang, 300 if long else 20, rng)
                    context = f"{before} {answer} {after}"
                    examples.append({"id": f"{split}{i}", "context": context, "question": _text(lang, 200, rng),
                                     "answers": [{"text": answer, "answer_start": len(before) + 1}]})
                else:
                    examples.append({"id": str(i), **{f: _text(lang, 1500 if long else 20, rng) for f in task.fields},
                                     "label": task.labels[i % len(task.labels)]})
            rows[(lang, split)] = examples
    return rows


def longest_rows(task: DictConfig, langs: list[str], data_dir: Path) -> dict[tuple[str, str], list[dict]]:
    """The longest examples of each (language, split) of a local data directory (parallel tasks:
    the same examples in every language, the longest over the languages); a split the directory
    lacks is generated."""
    from .data import DataError, load_examples

    def size(example: dict) -> int:
        return sum(len(example[f]) for f in task.fields)

    rows, generated = {}, generated_rows(task, langs)
    read = {}
    for lang in ["en", *langs]:
        for split in ROWS:
            try:
                read[(lang, split)] = load_examples(task, lang, split, data_dir)
            except (DataError, ValueError):
                rows[(lang, split)] = generated[(lang, split)]
    for (lang, split), examples in read.items():
        n = ROWS[split]
        if task.parallel:
            same = [read[(other, split)] for other in ["en", *langs] if (other, split) in read]
            count = min(len(e) for e in same)
            order = sorted(range(count), key=lambda i: -max(size(e[i]) for e in same))[:n]
        else:
            order = sorted(range(len(examples)), key=lambda i: -size(examples[i]))[:n]
        rows[(lang, split)] = [examples[i] for i in order]
    return rows


# -- the jobs -------------------------------------------------------------------------------
def compose(experiment: str, overrides: list[str], choice: dict) -> DictConfig:
    from .report.experiments import compose_jobs

    return compose_jobs(experiment, overrides, [choice])[0]


def rehearsal_overrides(work: Path) -> list[str]:
    return [f"output_dir={work / 'outputs'}", f"data.hub_mirror={work / 'hub'}", "data.dir=null", "device=cpu",
            f"stage1.max_steps={STEPS}", f"train.max_steps={STEPS}", "stage1.checkpoint_every=1",
            "train.checkpoint_every=1", f"data.max_train={ROWS['train']}", f"data.max_test={MICRO_BATCH}",
            f"data.max_validation={MICRO_BATCH}", f"train.eval_batch_size={MICRO_BATCH}",
            # the task's generation budget (8 or 32 new tokens), not the official 100: the shapes are
            # the same, and 100 tokens on every validation and test made the rehearsals several times longer
            "protocol.max_new_tokens=null"]


def on_stand_ins(cfg: DictConfig, folders: dict) -> DictConfig:
    """``cfg`` as composed, reading the stand-ins, with micro-batches of at most ``MICRO_BATCH``
    and at most ``ACCUMULATION`` of them a step (the memory remedy is applied first, as the job
    applies it)."""
    from .memory import fitted

    cfg = fitted(cfg)
    with open_dict(cfg):
        cfg.model.path = str(folders[cfg.model.name])
        cfg.model.tokenizer = str(folders["tokenizer", cfg.model.name])
        if cfg.mt.get("model"):
            cfg.mt.model = str(folders["nllb"])
        if cfg.protocol.mt_dtype == "auto":  # the MT models' dtype on a GPU
            cfg.protocol.mt_dtype = GPU_DTYPE
        for group in ("stage1", "train"):
            cfg[group].batch_size = min(int(cfg[group].batch_size), MICRO_BATCH)
            cfg[group].grad_accum = min(int(cfg[group].grad_accum), ACCUMULATION)
    return cfg


class _NLLBStandIn:
    """NLLB's translation path at the real lengths on the stand-in, in the job's dtype
    (``protocol.mt_dtype``), whose output (noise) is then replaced by the source text tagged
    with the target's code (``FakeTranslator``)."""

    def __init__(self, *args, **kwargs):
        from .translate import NLLBTranslator

        self.nllb = NLLBTranslator(*args, **kwargs)

    def translate(self, texts, src, tgt):
        from .translate import FakeTranslator

        self.nllb.translate(texts, src, tgt)
        return FakeTranslator().translate(texts, src, tgt)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def _attempt(outcomes: list[Outcome], logs: Path, stage: str, job, model: str, method: str, lang: str,
             blocked: str | None = None) -> bool:
    """Compose the job (``job(stage, model, method, lang)``) and run it; whether it passed."""
    from . import stages

    started = time.perf_counter()
    if blocked:
        result = f"not run: {blocked}"
    else:
        try:
            stages.run(job(stage, model, method, lang))
            result = "ok"
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # every failure is the rehearsal's finding (tokenizers' panics too)
            result = _reason(error)
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{stage}-{model}-{method}-{lang}.txt").write_text(traceback.format_exc())
    outcomes.append(Outcome(stage, model, method, lang, result, time.perf_counter() - started))
    print(f"[rehearse] {stage:9} {model:12} {method:15} {lang:4} {result[:140]}", flush=True)
    return result == "ok"


def rehearse(experiment: str, overrides: list[str], work: Path, longest_from: Path | None = None,
             stand_ins_root: Path | None = None) -> list[Outcome]:
    """Rehearse every job class of ``experiment``; the outcomes."""
    from . import pairs, stand_ins
    from .data.replicas import write_replica
    from .methods import method_for
    from .report.experiments import sweep_params

    if work.exists():
        if not (work / MARK).exists():
            raise SystemExit(f"error: {work} exists and is not a rehearsal's folder: choose another --work.")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARK).write_text("a rehearsal's scratch folder: emptied by the next rehearsal\n")
    stand_ins_root = stand_ins_root or work.parent / "stand-ins"
    params = sweep_params(experiment, overrides)
    models, methods, langs = params["model"], params["method"], params["lang"]
    common = [*overrides, *rehearsal_overrides(work)]
    base = compose(experiment, common, {"model": models[0], "method": methods[0], "lang": langs[0]})
    task = base.task
    rows = longest_rows(task, langs, longest_from) if longest_from else generated_rows(task, langs)
    write_replica(work / "hub", task, rows)
    chars = "".join(sorted({c for examples in rows.values() for e in examples for f in task.fields for c in e[f]}))
    folders = {"nllb": stand_ins.nllb_folder(stand_ins_root, chars + stand_ins.LATIN_EXTRA)}
    for model in models:
        folders[model] = stand_ins.model_folder(model, stand_ins_root)
        folders["tokenizer", model] = stand_ins.tokenizer_folder(model, stand_ins_root)

    def job(stage: str, model: str, method: str, lang: str) -> DictConfig:
        cfg = compose(experiment, common, {"model": model, "method": method, "lang": lang, "stage": stage})
        if method_for(cfg.method).needs_mt_encoder:  # FLARE MT's encoder: the NLLB stand-in
            OmegaConf.update(cfg, "method.encoder", str(folders["nllb"]))
        return on_stand_ins(cfg, folders)

    outcomes, logs = [], work / "logs"
    translated = {}
    real = pairs.NLLBTranslator
    pairs.NLLBTranslator = _NLLBStandIn
    try:
        if base.mt.name != "gold":
            for lang in langs:  # the stage translates every split, whichever method names it
                translated[lang] = _attempt(outcomes, logs, "translate", job, models[0], methods[-1], lang)
        stage1 = {model: _attempt(outcomes, logs, "stage1", job, model, "lora", langs[0]) for model in models}
        for i, (model, method) in enumerate((m, n) for m in models for n in methods):
            lang = langs[i % len(langs)]
            blocked = None if stage1[model] else f"stage 1 of {model} failed"
            if blocked is None and not translated.get(lang, True):
                blocked = f"the translation of {lang} failed"
            _attempt(outcomes, logs, "stage2", job, model, method, lang, blocked)
    finally:
        pairs.NLLBTranslator = real
    write_table(outcomes, work / "rehearsal.csv")
    return outcomes


def write_table(outcomes: list[Outcome], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "model", "method", "lang", "result", "seconds"])
        writer.writerows([o.stage, o.model, o.method, o.lang, o.result, f"{o.seconds:.1f}"] for o in outcomes)


def render(outcomes: list[Outcome], experiment: str) -> str:
    failed = [o for o in outcomes if o.result != "ok"]
    lines = [f"Rehearsal of {experiment}: {len(outcomes) - len(failed)} of {len(outcomes)} jobs ok", "",
             "| stage | model | method | lang | result | s |", "|---|---|---|---|---|---:|"]
    lines += [f"| {o.stage} | {o.model} | {o.method} | {o.lang} | {o.result} | {o.seconds:.1f} |" for o in outcomes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .report.experiments import command, split_experiment

    parser = argparse.ArgumentParser(prog="python -m flare_exp.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--longest-from", type=Path, default=None,
                        help="a local data directory: the copies hold its longest examples of each language")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default outputs/rehearse/<experiment>)")
    args, overrides = parser.parse_known_args(argv)
    experiment, overrides = split_experiment(overrides)

    def run() -> int:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        work = args.work or Path("outputs") / "rehearse" / experiment
        started = time.perf_counter()
        outcomes = rehearse(experiment, overrides, work, args.longest_from)
        print(render(outcomes, experiment))
        print(f"\n{time.perf_counter() - started:.0f} s in all (stand-ins built once into {work.parent / 'stand-ins'}); "
              f"the table: {work / 'rehearsal.csv'}")
        return 1 if any(o.result != "ok" for o in outcomes) else 0

    return command(run)


if __name__ == "__main__":
    sys.exit(main())
