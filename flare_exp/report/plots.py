"""Plots of the tables (PNG): per language, and FLARE minus LoRA."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .results import method_order


def plot(frame: pd.DataFrame, metric: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model, part in frame.groupby("model"):
        pivot = part.pivot_table(index="lang", columns="method", values=metric, aggfunc="mean") * 100
        pivot = pivot[method_order(pivot.columns)]
        ax = pivot.plot.bar(figsize=(max(6, 0.9 * len(pivot)), 4), width=0.8)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{part['task'].iloc[0]} — {model}: per language")
        ax.legend(fontsize=7, ncol=2)
        plt.tight_layout()
        path = folder / f"languages_{model}.png"
        plt.savefig(path, dpi=120)
        plt.close()
        written.append(path)
        if {"flare", "lora"} <= set(pivot.columns):
            diff = (pivot["flare"] - pivot["lora"]).sort_values()
            ax = diff.plot.bar(figsize=(max(5, 0.6 * len(diff)), 3.5),
                               color=["tab:green" if v > 0 else "tab:red" for v in diff])
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_ylabel(f"FLARE − LoRA ({metric}, points)")
            ax.set_title(f"{part['task'].iloc[0]} — {model}: FLARE minus LoRA")
            plt.tight_layout()
            path = folder / f"flare_minus_lora_{model}.png"
            plt.savefig(path, dpi=120)
            plt.close()
            written.append(path)
    return written
