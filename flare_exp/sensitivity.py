"""The sensitivity table of an experiment's re-evaluations (``stage=evaluate``).

    python -m flare_exp.sensitivity experiment=nusax_cpu_sensitivity data.dir=...   (make table-nusax-cpu-sensitivity)

Reads ``<run>/sources/<setting>/results.json`` of every job of the experiment and the LoRA runs
of the experiment it evaluates; writes ``sensitivity.{md,csv}`` and ``sensitivity.png`` under
``outputs/tables/<experiment>/`` (with the share of outputs naming no label where a decoder gave
any) and lists what has not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report.experiments import command, split_experiment
from .report.sensitivity import collect, plot, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="+", help="experiment=<name> and any Hydra overrides (data.dir=...)")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    args = parser.parse_args(argv)
    experiment, rest = split_experiment(args.overrides)
    frame, missing = collect(experiment, rest)
    folder = args.out / experiment
    folder.mkdir(parents=True, exist_ok=True)
    if missing:
        print(f"{len(missing)} evaluations have not run (this command runs nothing); first: "
              + " ".join(f"{k}={v}" for k, v in missing[0].items()))
        (folder / "missing.json").write_text(json.dumps(missing, indent=1) + "\n")
    if frame.empty:
        return
    frame.to_csv(folder / "sensitivity.csv", index=False)
    markdown = table(frame)
    if frame["invalid"].gt(0).any():  # a decoder's generations: how many named no label
        markdown += "\nOutputs naming no label (%):\n\n" + table(frame, "invalid")
    (folder / "sensitivity.md").write_text(markdown)
    plot(frame, folder / "sensitivity.png")
    print(f"{experiment}: the average over languages, mean ± std over seeds (runs in brackets); written to {folder}\n")
    print(markdown)


if __name__ == "__main__":
    sys.exit(command(main))
