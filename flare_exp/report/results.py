"""Finished runs as a table: one row per results.json, runs of differing settings told apart."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..methods import ORDER
from ..metrics import invalid_share
from ..record import NOT_IDENTITY


def load_results(paths) -> pd.DataFrame:
    """One row per results.json. Runs of one (task, model, mt, method) whose settings differ in
    anything but language and seed (two learning rates, a capped smoke run beside the full run)
    get those settings in their method name (``lora [train.lr=0.002]``), so no table averages
    them into one cell; ``setting`` holds them alone."""
    rows, identities = [], []
    for path in paths:
        result = json.loads(Path(path).read_text())
        row = {k: result[k] for k in ("task", "model", "mt", "method", "lang", "seed")}
        row.update({k: v for k, v in result["metrics"].items()})
        row["invalid_share"] = invalid_share(result["metrics"])
        row["english_score"] = result.get("stage1_english", {}).get(result.get("headline_metric", "accuracy"))
        row["run_dir"] = str(Path(path).parent)
        rows.append(row)
        identities.append(_identity(result))
    frame = pd.DataFrame(rows)
    settings = _differing_settings(rows, identities)
    frame["setting"] = settings
    if any(settings):
        frame["method"] = [m + (f" [{s}]" if s else "") for m, s in zip(frame["method"], settings)]
    return frame

def _identity(result: dict) -> dict:
    """The run's recorded identity, flat, without what cannot change a result by today's
    definition (a record written before a setting was found not to matter compares equal)."""
    return {k: v for k, v in _flatten(result.get("identity", {})).items()
            if not any(k == n or k.startswith(n + ".") for n in NOT_IDENTITY)}

def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

def _differing_settings(rows: list[dict], identities: list[dict]) -> list[str]:
    """For each run, ``key=value`` of the identity entries (other than the language's and the
    seed) that differ between runs of its (task, model, mt, method)."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["task"], row["model"], row["mt"], row["method"]), []).append(i)
    keys = sorted({k for identity in identities for k in identity if not k.startswith("lang.") and k != "seed"})
    differing = [k for k in keys if any(len({json.dumps(identities[i].get(k), sort_keys=True) for i in members}) > 1
                                        for members in groups.values())]
    return [", ".join(f"{k}={identity.get(k)}" for k in differing) for identity in identities]

def method_order(labels) -> list[str]:
    """Method labels in the paper's row order (settings after their method), others last."""
    def key(label):
        base = label.split(" [")[0].split("-")[0]
        return (ORDER.index(base) if base in ORDER else len(ORDER), label)
    return sorted(labels, key=key)

def format_table(frame, metric: str) -> str:
    """(model, method) x languages, in percent, as a small text table: one row per model and
    method (never an average over models; task and MT system too where they vary), the mean over
    seeds in a cell."""
    index = [k for k in ("task", "mt") if frame[k].nunique() > 1] + ["model", "method"]
    pivot = frame.pivot_table(index=index, columns="lang", values=metric, aggfunc="mean") * 100
    order = {m: i for i, m in enumerate(method_order(set(frame["method"])))}
    pivot = pivot.sort_index(key=lambda level: level.map(order) if level.name == "method" else level)
    english = frame["english_score"].dropna()
    lines = [pivot.round(2).to_string()]
    if len(english):
        lines.append(f"English test {metric} of the stage-1 model: {100 * english.mean():.2f}")
    return "\n".join(lines)
