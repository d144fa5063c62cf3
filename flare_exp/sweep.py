"""An experiment's sweep as dependent stages: translation, stage 1, then stage 2 and evaluation.

    python -m flare_exp.sweep experiment=paper_xnli                       # here, the stages in order
    python -m flare_exp.sweep experiment=paper_xnli --launcher slurm      # three chained job arrays
    python -m flare_exp.sweep experiment=paper_xnli --launcher slurm --wait   # ... and wait for the last

Each stage is one multirun of ``run.py`` over the parameters it depends on (translation: task x
language x MT system; stage 1: task x model x seed; stage 2: the whole sweep); a parameter a stage
does not depend on is pinned to its first value. Under SLURM every array is submitted at once and
the later ones wait through ``--dependency=afterany`` (stage 2 after translation and stage 1; stage 1
needs no translation), so no job holds a GPU while it waits. Stage-2 jobs (``stage=stage2``) fail at
once, naming the stage to run, where an input is missing: one failed translation or stage-1 job
costs only the stage-2 jobs that need its output, not the whole stage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from .access import preflight
from .methods import method_for
from .protocol import translations
from .settings import check_settings
from .report.experiments import command, split_experiment, sweep_configs, sweep_params

ROOT = Path(__file__).resolve().parent.parent
# The sweep parameters each stage depends on (the others are pinned to their first value).
DEPENDS = {"translate": {"task", "lang", "mt", "data.dir"}, "stage1": {"task", "model", "seed", "data.dir"}}


def jobs_of(experiment: str, overrides: list[str], launcher: str) -> list[tuple]:
    """(choices, composed config) of every job of the sweep (``hydra.launcher.*`` overrides need
    their launcher chosen)."""
    return sweep_configs(experiment, [f"hydra/launcher={launcher}", *overrides])


def stage_commands(experiment: str, overrides: list[str], launcher: str, wait: bool, ids: Path,
                   jobs: list[tuple] | None = None) -> list[tuple]:
    """(stage, run.py arguments) of each stage of ``experiment`` (its ``jobs``, composed here
    where not given), in order; an unknown method stops it."""
    jobs = jobs if jobs is not None else jobs_of(experiment, overrides, launcher)
    params = sweep_params(experiment, [f"hydra/launcher={launcher}", *overrides])
    methods = [method_for(cfg.method) for _, cfg in jobs]
    translates = any(cfg.mt.name != "gold" and translations(cfg.protocol, cfg.task, method)
                     for (_, cfg), method in zip(jobs, methods))
    base = [str(ROOT / "run.py"), "-m", f"experiment={experiment}", f"hydra/launcher={launcher}", *overrides]
    slurm = launcher == "slurm"
    stages = []
    for stage in (["translate"] if translates else []) + ["stage1", "stage2"]:
        pinned = [f"hydra.sweeper.params.{k}={values[0]}" for k, values in params.items()
                  if stage in DEPENDS and k not in DEPENDS[stage]]
        chain = []
        if slurm:
            chain = [f"chain.ids_file={ids / f'{stage}.ids'}",
                     f"chain.wait={str(wait and stage == 'stage2').lower()}"]
            if stage == "stage2":
                chain.append(f"chain.after=[{','.join(str(ids / f'{s}.ids') for s, _ in stages)}]")
        folder = f"hydra.sweep.dir=${{output_dir}}/sweeps/{ids.name}-{stage}"  # one folder a stage
        stages.append((stage, [*base, f"stage={stage}", folder, *pinned, *chain]))
    return stages


def chain_folder(output: str, experiment: str) -> Path:
    """A new folder for a chain's job-id files (its stages' sweep folders take its name), named by
    the time to the microsecond and created here: two chains started in the same second (a script
    submitting several) never share one."""
    folder = Path(output).resolve() / "chains" / f"{experiment}-{datetime.now().strftime('%Y-%m-%d_%H-%M-%S-%f')}"
    folder.mkdir(parents=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="+", help="experiment=<name> and any Hydra overrides")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait for the stage-2 array and print its summary")
    args = parser.parse_intermixed_args(argv)
    experiment, rest = split_experiment(args.overrides)
    output = next((o.split("=", 1)[1] for o in rest if o.startswith("output_dir=")), "outputs")
    jobs = jobs_of(experiment, rest, args.launcher)
    for _, cfg in jobs:  # before anything is submitted (each job fitted to its GPU): every job's settings,
        check_settings(cfg, method_for(cfg.method))
    preflight([cfg for _, cfg in jobs])  # its method and every hub repository it reads
    ids = chain_folder(output, experiment)
    for stage, arguments in stage_commands(experiment, rest, args.launcher, args.wait, ids, jobs):
        print(f"== {stage}: run.py {' '.join(arguments[2:])}", flush=True)
        done = subprocess.run([sys.executable, *arguments])
        if done.returncode:
            print(f"The {stage} sweep failed (exit status {done.returncode}); later stages not started.",
                  file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
