"""The summary of a multirun: one CSV of every job's results and a methods x languages table
(a Hydra callback, ``hydra.callbacks.summary`` in conf/config.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..record import POINTER
from .results import format_table, load_results


class SweepSummary(Callback):
    """After a multirun: one CSV of every job's results and a methods x languages table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not config.get("chain", {}).get("wait", True):
            print(f"Submitted; the jobs run after their dependencies. Their folders: {sweep}")
            return
        pointers = sorted(sweep.glob(f"*/{POINTER}"))
        results = [json.loads(p.read_text())["results"] for p in pointers]
        results = [r for r in results if r and Path(r).is_file()]
        failed = sorted(sweep.glob("*/FAILED"))
        for marker in failed:
            overrides, _, error = marker.read_text().partition("\n")
            print(f"FAILED job {marker.parent.name} ({overrides}): {error.strip()}")
        failed, jobs = len(failed), len({p.parent for p in sweep.glob("*/.hydra")} | {m.parent for m in failed})
        if config.get("stage") == "evaluate":  # results lie beside each run, under sources/<setting>/
            print(f"Evaluations written beside their runs (<run>/sources/<setting>/); the table: "
                  f"python -m flare_exp.sensitivity experiment={config.experiment_name or '<name>'} ...")
        elif not results:
            print(f"No finished runs in {sweep}.")
        else:
            self._report(config, sweep, results, failed)
        if failed:
            others = "the others finished" if failed < jobs else "none finished"
            raise SystemExit(f"{failed} of {jobs} job(s) of the sweep failed; {others} (see above).")

    @staticmethod
    def _report(config: DictConfig, sweep: Path, results: list, failed: int) -> None:
        frame = load_results(results)
        csv_path = sweep / "summary.csv"
        frame.to_csv(csv_path, index=False)
        metric = config.task.metric if config.task.metric in frame else "accuracy"
        print(f"\n{metric} (%) — {len(frame)} runs{f', {failed} failed' if failed else ''}; all results: {csv_path}")
        print(format_table(frame, metric))
