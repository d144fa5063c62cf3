"""Plots of the tables (PNG): per language, and FLARE minus LoRA."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .results import method_order


def plot(frame: pd.DataFrame, metric: str, folder: Path) -> list[Path]:
    """Per model: methods x languages as bars (the mean over seeds, the std over seeds as error
    bars where there are several), and FLARE minus LoRA per language; legends beside the axes,
    never over a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model, part in frame.groupby("model"):
        seeds = part["seed"].nunique() if "seed" in part else 1
        pivot = part.pivot_table(index="lang", columns="method", values=metric, aggfunc="mean") * 100
        order = method_order(pivot.columns)
        spread = part.pivot_table(index="lang", columns="method", values=metric, aggfunc="std")[order] * 100 \
            if seeds > 1 else None
        ax = pivot[order].plot.bar(figsize=(max(6, 0.9 * len(pivot)) + 2, 4), width=0.8, yerr=spread, capsize=2,
                                   error_kw={"elinewidth": 0.8})
        ax.set_ylabel(f"{metric} (%)" + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
        ax.set_title(f"{part['task'].iloc[0]} — {model}: per language")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        written.append(_save(plt, folder / f"languages_{model}.png"))
        if {"flare", "lora"} <= set(pivot.columns):
            keys = ["lang", "seed"] if "seed" in part else ["lang"]
            paired = (part[part["method"] == "flare"].set_index(keys)[metric]
                      - part[part["method"] == "lora"].set_index(keys)[metric]).dropna() * 100
            by_lang = paired.groupby(level="lang")
            diff = by_lang.mean().sort_values()
            error = by_lang.std().reindex(diff.index) if seeds > 1 else None
            ax = diff.plot.bar(figsize=(max(5, 0.6 * len(diff)), 3.5), yerr=error, capsize=2,
                               color=["tab:green" if v > 0 else "tab:red" for v in diff])
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_ylabel(f"FLARE − LoRA ({metric}, points)")
            ax.set_title(f"{part['task'].iloc[0]} — {model}: FLARE minus LoRA"
                         + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""))
            written.append(_save(plt, folder / f"flare_minus_lora_{model}.png"))
    return written


def _save(plt, path: Path) -> Path:
    plt.tight_layout()
    plt.savefig(path, dpi=120, bbox_inches="tight")
    plt.close()
    return path
