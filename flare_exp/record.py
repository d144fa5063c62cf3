"""The run record: what identifies a run, where its stages write, and how it is written and read.

``results.json`` in a deterministic run directory is the source of truth for tables; a run whose
results.json exists (with the same identity) is skipped unless ``force=true``. Nothing here loads
a model library, so the sweep, the planner, the tables and the SLURM launcher's done-check use it
without importing torch.

    runs/<task>/<model>/<mt>/<method label>/<lang>/seed<k>-<hash>/   a run (stage 2 + evaluation)
        results.json, predictions.jsonl, config.yaml, adapter.safetensors
        sources/<source label>/                                    a re-evaluation (stage=evaluate)
    stage1/<task>/<model>/seed<k>-<hash>/                          the cached stage-1 adapter
    translations/<task>/<split>/<direction>-<lang>/<mt name>.jsonl the translation cache
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .methods import method_for
from .protocol import identity as protocol_identity
from .protocol import quotes_test, quotes_train

POINTER = "run.json"  # written into Hydra's job folder: where this job's results went
ADAPTER = "adapter.safetensors"  # a run's trained stage 2, beside its results.json
RESULTS = "results.json"
STAGE1_RECORD = "stage1.json"

# Config entries that cannot change a run's result: where it is written, how it is tracked, where
# it runs, how it is grouped, how often it checkpoints, the evaluation batch size, what else it
# saves, how empty texts are reported, how stage sweeps are chained; the English a re-evaluation
# reads (stage=evaluate writes beside the run it evaluates, in sources/).
NOT_IDENTITY = ("hydra", "output_dir", "tracking", "force", "device", "stage", "experiment_name",
                "train.checkpoint_every", "train.eval_batch_size", "stage1.checkpoint_every", "data.empty_texts",
                "data.hub_mirror", "cluster",
                "chain", "train.save_adapter", "source")


# -- writing ---------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    os.replace(staging, path)


def write_lines_atomic(path: Path, rows: list[dict]) -> None:
    """JSON lines, written as ``write_json_atomic`` writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(staging, path)


def write_run(out: Path, cfg: DictConfig, rows: list[dict], result: dict) -> None:
    """A run's (or an evaluation's) config, predictions and results; results.json last: its
    presence marks the run finished."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_lines_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / RESULTS, result)


# -- identity --------------------------------------------------------------------------------
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
    if "protocol" in identity:
        identity["protocol"] = protocol_identity(identity["protocol"])
    return identity


def run_dir(cfg: DictConfig) -> Path:
    """``runs/<task>/<model>/<mt>/<method label>/<lang>/seed<k>-<hash of the run identity>``."""
    return (Path(cfg.output_dir) / "runs" / cfg.task.name / cfg.model.name / cfg.mt.name
            / method_for(cfg.method).label / cfg.lang.code / f"seed{cfg.seed}-{config_hash(run_identity(cfg), 8)}")


def stage1_key(cfg: DictConfig) -> str:
    """The hash of what stage 1 depends on: the task, the model, ``stage1.*`` (how often it
    checkpoints aside), the seed, the data and the protocol's settings."""
    identity = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "stage1": {k: v for k, v in OmegaConf.to_container(cfg.stage1, resolve=True).items()
                   if k != "checkpoint_every"},
        "seed": cfg.seed,
        "data": {"dir": str(cfg.data.dir) if cfg.data.dir else None, "max_train": cfg.data.max_train},
        "protocol": {k: v for k, v in protocol_identity(OmegaConf.to_container(cfg.protocol, resolve=True)).items()
                     if k != "name"},
    }
    return config_hash(identity, 12)


def stage1_dir(cfg: DictConfig) -> Path:
    return (Path(cfg.output_dir) / "stage1" / cfg.task.name / cfg.model.name
            / f"seed{cfg.seed}-{stage1_key(cfg)}")


def source_label(source: DictConfig) -> str:
    """The folder name of a re-evaluation's English source (``cfg.source``): ``noised-0.1-seed0``."""
    return source.mode + (f"-{source.rate:g}" if source.mode == "noised" else "") + (
        f"-seed{source.seed}" if source.mode in ("noised", "mismatched") else "")


def evaluation_dir(cfg: DictConfig) -> Path:
    """Where ``stage=evaluate`` writes: ``<run>/sources/<source label>``."""
    return run_dir(cfg) / "sources" / source_label(cfg.source)


# -- translation caches ------------------------------------------------------------------------
def translator_name(cfg: DictConfig) -> str:
    """The name of the configured MT system that names its caches: the MT config's name, its
    beams and length (``fake`` alone, or with the hash of the texts it loses markers in)."""
    mt = cfg.mt
    if mt.name == "fake":
        lose = list(mt.get("lose_markers_in") or [])
        return f"fake-lose{config_hash(lose, 6)}" if lose else "fake"
    return f"{mt.name}-beams{mt.get('beams') or 'default'}-len{translation_max_length(cfg)}"


def translation_max_length(cfg: DictConfig):
    """The MT length limit: the task's ``mt_max_length`` where it sets one, else the MT config's."""
    return cfg.task.get("mt_max_length") or cfg.mt.get("max_length")


def cache_file(root: Path, task: str, split: str, direction: str, lang: str, name: str) -> Path:
    return Path(root) / task / split / f"{direction}-{lang}" / f"{name}.jsonl"


def translation_cache(cfg: DictConfig, split: str, direction: str) -> Path:
    """The cache of ``split`` translated in ``direction`` (en-x: English into the run's language;
    x-en: the run's language into English) by the configured MT system; QA data translated with
    its answers marked as the official code marks them (``protocol.quotes_test``,
    ``protocol.quotes_train``) has its own."""
    name = translator_name(cfg)
    if (split, direction) == ("test", "x-en") and quotes_test(cfg.protocol, cfg.task, method_for(cfg.method)):
        name += "+quotes"
    if direction == "en-x" and quotes_train(cfg.protocol, cfg.task):
        name += "+quotes"
    return cache_file(Path(cfg.output_dir) / "translations", cfg.task.name, split, direction, cfg.lang.code, name)


def read_cache(path: Path) -> dict[str, dict]:
    """``{id: {field: translation}}`` of a translation cache (empty where there is none)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by an interruption: translated again
        done[row["id"]] = row["fields"]
    return done


# -- reading ---------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def summary_line(result: dict) -> str:
    metrics = result["metrics"]
    counts = ("n", "invalid", "unread_gold")
    scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k not in counts)
    unread = (f", unread gold={metrics['unread_gold']}: always wrong (docs/protocol.md, decoder_scoring)"
              if metrics.get("unread_gold") else "")
    return (f"{result['task']} {result['model']} {result['method']} {result['lang']} seed{result['seed']}: "
            f"{scores} (n={metrics['n']}, invalid={metrics['invalid']}{unread})")


def finished_run(out: Path, identity: dict, force: bool, quiet: bool = False) -> dict | None:
    """The record of the run in ``out`` if it finished earlier with ``identity`` (and not
    ``force``); a run of other settings there is refused (ConfigError)."""
    path = out / RESULTS
    if force or not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("identity") != identity:
        raise ConfigError(f"{out} holds a run of other settings: move it away, or rerun it with force=true.")
    if not quiet:
        print(f"[skipped: finished earlier with these settings, force=true reruns it] {summary_line(result)}")
    return result


def finished_evaluation(folder: Path, out: Path, force: bool, quiet: bool = False) -> dict | None:
    """The evaluation in ``folder`` if it is of the run now in ``out`` (not of an earlier training
    of it) and not ``force``."""
    path = folder / RESULTS
    if force or not path.is_file() or not (out / RESULTS).is_file():
        return None
    result, trained = json.loads(path.read_text()), json.loads((out / RESULTS).read_text())
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
        return (stage1_dir(cfg) / STAGE1_RECORD).is_file()
    out = run_dir(cfg)
    if cfg.stage == "evaluate":
        return finished_evaluation(evaluation_dir(cfg), out, force=False, quiet=True) is not None
    return finished_run(out, run_identity(cfg), force=False, quiet=True) is not None
