"""Run directories, results.json, sweep summaries and the W&B mirror.

``results.json`` in a deterministic run directory is the source of truth for tables; a run whose
results.json exists is skipped unless ``force=true``. W&B only mirrors it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .methods import method_for

POINTER = "run.json"  # written into Hydra's job folder: where this job's results went


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    os.replace(staging, path)


def write_lines_atomic(path: Path, rows: list[dict]) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(staging, path)


# Config entries that cannot change a run's result: where it is written, how it is tracked, where
# it runs, how it is grouped, how often it checkpoints, the evaluation batch size, what else it
# saves, how empty texts are reported, how stage sweeps are chained; the English a re-evaluation
# reads (stage=evaluate writes beside the run it evaluates, in sources/).
NOT_IDENTITY = ("hydra", "output_dir", "tracking", "force", "device", "stage", "experiment_name",
                "train.checkpoint_every", "train.eval_batch_size", "stage1.checkpoint_every", "data.empty_texts", "chain", "train.save_adapter", "source")


def config_hash(data: dict, length: int) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def run_identity(cfg: DictConfig) -> dict:
    """Everything in the resolved config that can change a run's result."""
    identity = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = identity
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return identity


def run_dir(cfg: DictConfig) -> Path:
    """``runs/<task>/<model>/<mt>/<method label>/<lang>/seed<k>-<hash of the run identity>``."""
    return (Path(cfg.output_dir) / "runs" / cfg.task.name / cfg.model.name / cfg.mt.name
            / method_for(cfg.method).label / cfg.lang.code / f"seed{cfg.seed}-{config_hash(run_identity(cfg), 8)}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def summary_line(result: dict) -> str:
    metrics = result["metrics"]
    scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k not in ("n", "invalid"))
    return (f"{result['task']} {result['model']} {result['method']} {result['lang']} seed{result['seed']}: "
            f"{scores} (n={metrics['n']}, invalid={metrics['invalid']})")


@contextmanager
def tracker(cfg: DictConfig, directory: Path, enabled: bool = True):
    """A W&B run mirroring this run (``tracking.mode``), always closed, even on failure."""
    if cfg.tracking.mode == "disabled" or not enabled:
        yield None
        return
    import wandb

    method = method_for(cfg.method)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity, mode=cfg.tracking.mode,
        dir=str(directory), group=cfg.experiment_name or f"{cfg.task.name}-{cfg.model.name}",
        name=f"{method.label}-{cfg.lang.code}-seed{cfg.seed}",
        tags=[method.name, cfg.lang.code, f"seed{cfg.seed}", cfg.task.name, cfg.model.name],
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        yield run
    finally:
        run.finish()


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
        from .tables import format_table, load_results

        frame = load_results(results)
        csv_path = sweep / "summary.csv"
        frame.to_csv(csv_path, index=False)
        metric = config.task.metric if config.task.metric in frame else "accuracy"
        print(f"\n{metric} (%) — {len(frame)} runs{f', {failed} failed' if failed else ''}; all results: {csv_path}")
        print(format_table(frame, metric))
