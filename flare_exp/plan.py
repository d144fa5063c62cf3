"""A sweep's plan before anything is submitted: the jobs of each stage, what is already done,
and the GPU-hours still to spend, estimated from the throughput table in ``docs/throughput.csv``.

    python -m flare_exp.plan experiment=paper_xnli [overrides]      # make plan-xnli

Stages: translation (task x language x split x direction x MT system, where a method needs MT),
stage 1 (task x model x seed x stage-1 settings) and stage 2 with evaluation (every job). Done:
the translation cache exists, the stage-1 adapter is cached, the run's results.json exists.
Estimates: training steps x the step time of the (model, method) row at the paper's batch and
length (scaled to the task's length and the configured batch), evaluation at a third of a step
per batch, translation at ``TRANSLATE_PER_S``, ``STARTUP_S`` for every stage-1 and stage-2 job's
start; each row says whether its figures were measured or estimated. Each job is costed as it
will run, with the memory remedy its GPU needs (``flare_exp.memory``), and the plan ends with the
estimated peak memory and remedy of every training job class.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omegaconf import DictConfig

from . import memory
from .memory import THROUGHPUT
from .methods import method_class, method_for
from .protocol import input_length, translations
from .record import STAGE1_RECORD, RESULTS, run_dir, stage1_dir, translation_cache
from .report.experiments import command, split_experiment, sweep_configs

# English training, validation and per-language test sizes of the paper's tasks (their dataset
# cards: MultiNLI train for XNLI, TyDiQA-GoldP, NusaX-senti); the demo is generated.
SIZES = {
    "xnli": {"train": 392_702, "validation": 2_490, "test": 5_010},
    "tydiqa": {"train": 3_696, "validation": 370,
               "test": {"ar": 921, "bn": 113, "fi": 782, "id": 565, "ko": 276, "ru": 812, "sw": 499, "te": 669}},
    "nusax": {"train": 500, "validation": 100, "test": 400},
    "demo": {"train": 300, "validation": 60, "test": 300},
}
TRANSLATE_PER_S = 25.0  # examples a second through NLLB-200 3.3B on one GPU: an estimate, not measured
STARTUP_S = 180.0  # a job's start: loading (and quantising) its models, an estimate, not measured


def _size(task: str, split: str, lang: str) -> int:
    size = SIZES.get(task, {}).get(split, 0)
    return size.get(lang, 0) if isinstance(size, dict) else size


def _step(table: dict, cfg: DictConfig, method, group: str) -> tuple[float, str]:
    """(seconds per optimizer step, measured | estimate) of ``method`` (its throughput row,
    ``Method.cost_row``; stage 1 is costed as LoRA) on ``cfg``'s model, with ``cfg[group]``'s
    settings as the stage trains with them."""
    settings = memory.training_settings(cfg, group)
    row = table.get((cfg.model.name, method.cost_row, bool(settings.gradient_checkpointing)))
    if row is None:
        return float("nan"), "no row"
    scale = (settings.batch_size / int(row["batch"])) * (input_length(cfg.protocol, cfg.task) / int(row["length"]))
    source = "measured" if row["source"] == "measured" and method.cost_measured else "estimate"
    return float(row["step_s"]) * scale * settings.grad_accum, source


LORA = method_class("lora")  # stage 1 trains a LoRA adapter


def plan(experiment: str, overrides: list[str], table_path: Path = THROUGHPUT) -> dict:
    """{stage: {"jobs", "done", "hours", "sources"}} of the experiment's sweep, and under
    ``"memory"`` each training job class's fit (``memory_fits``)."""
    table = memory.throughput_table(table_path)
    fits: dict = {}
    stages = {name: {"jobs": {}, "done": 0, "hours": 0.0, "sources": set(), "disk_gb": 0.0}
              for name in ("translate", "stage1", "stage2")}

    def add(stage: str, key, done: bool, hours: float, source: str, disk_gb: float = 0.0) -> None:
        entry = stages[stage]
        if key in entry["jobs"]:
            return
        entry["jobs"][key] = done
        entry["done"] += done
        entry["disk_gb"] += disk_gb
        if not done:
            entry["hours"] += hours
            entry["sources"].add(source)

    for _, cfg in sweep_configs(experiment, overrides, fit=False):
        method, task, lang = method_for(cfg.method), cfg.task.name, cfg.lang.code
        fits.update(memory.job_fits(cfg, table))
        cfg = memory.fitted(cfg, table)  # the job as it runs: its remedy applied
        if cfg.mt.name != "gold":
            for split, direction in translations(cfg.protocol, cfg.task, method):
                path = translation_cache(cfg, split, direction)
                size = _size(task, split, "en" if direction == "en-x" else lang)
                add("translate", path, path.is_file(), size / TRANSLATE_PER_S / 3600, "estimate")
        english = _size(task, "train", "en")
        step, source = _step(table, cfg, LORA, "stage1")
        steps = math.ceil(english / (cfg.stage1.batch_size * cfg.stage1.grad_accum)) * cfg.stage1.epochs
        add("stage1", stage1_dir(cfg), (stage1_dir(cfg) / STAGE1_RECORD).is_file(),
            (STARTUP_S + steps * step) / 3600, source, memory.checkpoint_gb(cfg))
        step, source = _step(table, cfg, method, "train")
        steps = math.ceil(english / (cfg.train.batch_size * cfg.train.grad_accum)) * cfg.train.epochs
        batches = math.ceil(_size(task, "test", lang) / cfg.train.batch_size) * method.length_factor
        evaluations = 10 * math.ceil(_size(task, "validation", lang) / cfg.train.batch_size) * method.trains
        hours = (STARTUP_S + (steps if method.trains else 0) * step + (batches + evaluations) * step / 3) / 3600
        add("stage2", run_dir(cfg), (run_dir(cfg) / RESULTS).is_file(), hours, source,
            memory.checkpoint_gb(cfg) if method.trains and cfg.train.get("save_adapter", True) else 0.0)
    return {**{name: {"jobs": len(e["jobs"]), "done": e["done"], "hours": e["hours"],
                      "sources": sorted(e["sources"]), "disk_gb": e["disk_gb"]} for name, e in stages.items()},
            "memory": fits}


def format_plan(experiment: str, stages: dict) -> str:
    lines = [f"{experiment}: the plan before anything is submitted", "",
             "| stage | jobs | done | to run | GPU-hours to run | figures |", "|---|---|---|---|---|---|"]
    for name, s in stages.items():
        if name == "memory":
            continue
        hours = "–" if not s["jobs"] - s["done"] else f"{s['hours']:,.1f}" if s["hours"] >= 1 else f"{s['hours']:.2f}"
        lines.append(f"| {name} | {s['jobs']} | {s['done']} | {s['jobs'] - s['done']} | {hours} | "
                     f"{', '.join(s['sources']) or '–'} |")
    total = sum(s["hours"] for n, s in stages.items() if n != "memory")
    lines += ["", f"GPU-hours to run in all: {total:,.1f} (step times from {THROUGHPUT.name}: "
              "the measured rows on one H100, the others estimates)."]
    disk = {n: s["disk_gb"] for n, s in stages.items() if n != "memory" and s.get("disk_gb")}
    if disk:
        lines += ["", f"Checkpoints on disk when all have run: {sum(disk.values()):,.0f} GB ("
                  + ", ".join(f"{n} {gb:,.0f} GB" for n, gb in disk.items())
                  + "): the decoders' trained LM heads and embeddings, saved with each trained job in their "
                  "training dtype (flare_exp/memory.py, checkpoint_gb; the LoRA adapters, megabytes, aside; "
                  "train.save_adapter=false keeps no stage-2 adapter)."]
    fits = stages.get("memory") or {}
    if fits:
        lines += ["", "Peak GPU memory of each training job class (estimated from the throughput rows' peaks; "
                  "flare_exp/memory.py):", "",
                  "| stage | task | model | method | tokens | peak GB | remedy | peak GB after | fits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (stage, task, model, label, length), f in sorted(fits.items()):
            remedy = " ".join(f"{k}={v}" for k, v in f.remedy.items()) or "–"
            lines.append(f"| {stage} | {task} | {model} | {label} | {length} | {f.peak_gb:.1f} | {remedy} | "
                         f"{f.remedied_gb:.1f} | {'yes' if f.fits else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="+", help="experiment=<name> and any Hydra overrides")
    args = parser.parse_args(argv)
    experiment, rest = split_experiment(args.overrides)
    print(format_plan(experiment, plan(experiment, rest)))


if __name__ == "__main__":
    sys.exit(command(main))
