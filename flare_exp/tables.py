"""Paper-shaped tables and plots from finished runs (results.json files); never trains.

    python -m flare_exp.tables experiment=paper_nusax [data.dir=...] [--out outputs/tables]

Writes, under ``<out>/<experiment>/``: ``table.{md,tex,csv}`` (methods x models, the average
over languages, mean +- std over seeds, the best method of each model in bold, the paper's
number and our difference beside it), ``languages_<model>.md`` (methods x languages),
``diagnostics_<model>.md`` (invalid outputs per language and the stage-1 English score),
``significance.md`` (FLARE vs LoRA, paired bootstrap over test examples),
``significance_input_fusion.md`` (input fusion vs FLARE, where both ran) and ``plots/*.png``;
beneath the table, the official-code bugs its numbers carry (``protocol=official``).
Runs the experiment declares but that have not finished are listed, not trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import protocol
from .methods import method_for
from .report.experiments import command, expected_runs, split_experiment
from .report.plots import plot
from .report.results import load_results
from .report.significance import significance_table
from .report.tables import diagnostics_table, language_table, paper_table, summary


def bug_notes(results: list[Path]) -> str:
    """Beneath a table: each official-code bug its numbers carry (``protocol.bugs``), with the
    model and method rows it changes; empty where none does."""
    rows: dict[str, tuple[str, set]] = {}
    unread, scored, cut = 0, 0, set()  # the official NusaX golds read as no label, their runs' items and rows
    for path in results:
        result = json.loads(path.read_text())
        cfg = OmegaConf.create(result.get("config", {}))
        if not all(k in cfg for k in ("protocol", "task", "model", "method")):  # a record without them
            continue
        method = method_for(cfg["method"])
        for key, note in protocol.bugs(cfg, method).items():
            rows.setdefault(key, (note, set()))[1].add(f"{cfg.model.name} {method.label}")
        if result.get("metrics", {}).get("unread_gold"):
            unread, scored = unread + result["metrics"]["unread_gold"], scored + result["metrics"]["n"]
            cut.add(f"{cfg.model.name} {method.label}")
    if cut:
        rows["decoder_scoring"] = ("a test prompt cut by its answer's length reads its gold as no label: the item is "
                                   "wrong whatever the output, and macro-F1 averages over that empty class too "
                                   f"(at most 75); {unread} of the {scored} test items of these runs", cut)
    if not rows:
        return ""
    lines = ["", "These numbers carry the official code's bugs (protocol=official; docs/protocol.md):"]
    for key, (note, where) in rows.items():
        lines.append(f"* `protocol.{key}` ({', '.join(sorted(where))}): {note}")
    return "\n".join(lines) + "\n"


def build(experiment: str, overrides: list[str], out: Path, samples: int = 1000) -> dict:
    jobs = expected_runs(experiment, overrides)
    finished = [d / "results.json" for _, d in jobs if (d / "results.json").is_file()]
    missing = [choice for choice, d in jobs if not (d / "results.json").is_file()]
    folder = out / experiment
    folder.mkdir(parents=True, exist_ok=True)
    report = {"experiment": experiment, "declared": len(jobs), "finished": len(finished), "missing": missing}
    if missing:
        print(f"{len(missing)} of {len(jobs)} runs of {experiment} have not finished (this command trains nothing):")
        for choice in missing[:20]:
            print("  " + " ".join(f"{k}={v}" for k, v in choice.items()))
        if len(missing) > 20:
            print(f"  ... and {len(missing) - 20} more (all in {folder / 'missing.json'})")
        (folder / "missing.json").write_text(json.dumps(missing, indent=1) + "\n")
    if not finished:
        return report
    frame = load_results(finished)
    metric = json.loads(finished[0].read_text())["headline_metric"]
    declared = {k: len({choice.get(k) for choice, _ in jobs}) if any(k in c for c, _ in jobs) else None
                for k in ("lang", "seed")}
    table = summary(frame, metric, declared["lang"], declared["seed"])
    table.to_csv(folder / "table.csv", index=False)
    markdown = paper_table(table) + bug_notes(finished)
    (folder / "table.md").write_text(markdown)
    (folder / "table.tex").write_text(paper_table(table, latex=True))
    for model in dict.fromkeys(frame["model"]):
        (folder / f"languages_{model}.md").write_text(language_table(frame, model, metric))
        (folder / f"diagnostics_{model}.md").write_text(diagnostics_table(frame, model))
    if {"flare", "lora"} <= set(frame["method"]):
        (folder / "significance.md").write_text(significance_table(frame, metric, samples))
    if {"flare", "input_fusion"} <= set(frame["method"]):  # FLARE's fair competitor: the same English, in the input
        (folder / "significance_input_fusion.md").write_text(significance_table(frame, metric, samples, "input_fusion", "flare"))
    report["plots"] = [str(p) for p in plot(frame, metric, folder / "plots")]
    print(f"{experiment}: {metric} (%), average over languages; written to {folder}\n")
    print(markdown)
    return report

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Paper-shaped tables and plots from finished runs.")
    parser.add_argument("overrides", nargs="+", help="experiment=<name> and any Hydra overrides (data.dir=...)")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    experiment, rest = split_experiment(args.overrides)
    build(experiment, rest, args.out, args.samples)


if __name__ == "__main__":
    sys.exit(command(main))
