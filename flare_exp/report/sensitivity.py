"""The sensitivity table: each method's score under each test-time English source, beside the
chrF of that English against the English the runs were trained with, and LoRA (which reads no
English) as the constant baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf, open_dict

from ..metrics import invalid_share
from ..record import evaluation_dir, run_dir, source_label
from .experiments import CONF, sweep_configs
from .results import method_order
from .tables import format_cell


def collect(experiment: str, overrides: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """(one row per finished evaluation, and one per LoRA run of the same languages and seeds;
    the choices of the evaluations not run yet)."""
    rows, missing, baselines = [], [], set()
    for choice, cfg in sweep_configs(experiment, overrides):
        path = evaluation_dir(cfg) / "results.json"
        if not path.is_file():
            missing.append(choice)
            continue
        result = json.loads(path.read_text())
        metric = result["headline_metric"]
        quality = result["source"]["quality_to_trained_english"]
        rows.append({"method": result["method"], "lang": result["lang"], "seed": result["seed"],
                     "source": source_label(cfg.source), "score": 100 * result["metrics"][metric], "metric": metric,
                     "invalid": invalid_share(result["metrics"]),
                     "chrf": sum(q["chrf"] for q in quality.values()) / len(quality)})
        lora = cfg.copy()
        with open_dict(lora):
            lora.method = OmegaConf.load(CONF / "method" / "lora.yaml")
        baselines.add(run_dir(lora) / "results.json")
    for path in sorted(baselines):
        if path.is_file():
            result = json.loads(path.read_text())
            rows.append({"method": "lora", "lang": result["lang"], "seed": result["seed"], "source": "(none)",
                         "score": 100 * result["metrics"][result["headline_metric"]],
                         "metric": result["headline_metric"], "chrf": float("nan"),
                         "invalid": invalid_share(result["metrics"])})
    return pd.DataFrame(rows), missing

def table(frame: pd.DataFrame, value: str = "score") -> str:
    """Methods x sources: ``value`` (``score``, or ``invalid``: the share of outputs naming no
    label) averaged over the languages of each seed, then its mean ± std over seeds (as the main
    tables: ± only with several seeds), the number of runs in brackets; and the English's chrF."""
    modes = ["as_trained", "noised", "mismatched", "target", "empty", "(none)"]
    sources = sorted(set(frame["source"]), key=lambda s: (next(i for i, m in enumerate(modes) if s.startswith(m)), s))
    per_seed = frame.groupby(["method", "source", "seed"])[value].mean().groupby(["method", "source"])
    cells = pd.DataFrame({"mean": per_seed.mean(), "std": per_seed.std().fillna(0.0), "seeds": per_seed.count(),
                          "runs": frame.groupby(["method", "source"])[value].count()})
    chrf = frame[frame["method"] != "lora"].groupby("source")["chrf"].mean()
    lines = ["| method | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for method in method_order(set(frame["method"])):
        row = []
        for source in sources:
            if (method, source) not in cells.index:
                row.append("–")
                continue
            c = cells.loc[(method, source)]
            row.append(format_cell(c["mean"], c["std"], int(c["seeds"]), False, False, str(int(c["runs"]))))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append("| chrF of the English | " + " | ".join(f"{chrf[s]:.1f}" if s in chrf else "–" for s in sources) + " |")
    return "\n".join(lines) + "\n"

def plot(frame: pd.DataFrame, path: Path) -> Path:
    """Each method's score against the chrF of its test-time English (the mean over seeds of each
    seed's average over languages, the std over seeds as error bars where there are several);
    LoRA as a line; the legend beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    english = frame[frame["method"] != "lora"]
    per_seed = english.groupby(["method", "source", "seed"])[["score", "chrf"]].mean().groupby(["method", "source"])
    points = per_seed.mean().join(per_seed["score"].std().fillna(0.0).rename("spread")).reset_index()
    for method, part in points.groupby("method"):
        part = part.sort_values("chrf")
        several = frame.loc[frame["method"] == method, "seed"].nunique() > 1
        ax.errorbar(part["chrf"], part["score"], yerr=part["spread"] if several else None, marker="o", capsize=2,
                    label=method)
        for _, row in part.iterrows():
            ax.annotate(row["source"], (row["chrf"], row["score"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    lora = frame[frame["method"] == "lora"]["score"]
    if len(lora):
        ax.axhline(lora.mean(), color="grey", linestyle="--", label="lora (no English)")
    ax.set_xlabel("chrF of the test-time English against the trained-with English")
    seeds = frame["seed"].nunique()
    ax.set_ylabel(f"{frame['metric'].iloc[0]} (%)" + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
