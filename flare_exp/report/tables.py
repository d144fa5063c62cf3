"""Paper-shaped tables: the average over languages (mean ± std over seeds) beside the paper's
number, methods x languages, and the diagnostics of a decoder's outputs."""

from __future__ import annotations

import pandas as pd

from ..paper_results import paper_value
from .results import method_order


def by_seed(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The average over languages of each (task, model, mt, method, seed), in percent."""
    grouped = frame.groupby(["task", "model", "mt", "method", "seed"])
    out = grouped[metric].mean().mul(100).rename("score").reset_index()
    out["languages"] = grouped["lang"].nunique().values
    return out

def summary(frame: pd.DataFrame, metric: str, languages: int | None = None, seeds: int | None = None) -> pd.DataFrame:
    """Mean and std over seeds of the average over languages. A cell whose runs cover fewer than
    the table's declared ``languages`` (in any seed) or ``seeds`` is marked incomplete: its
    average is over another set than the paper's, so it is not compared with the paper's."""
    by = by_seed(frame, metric)
    grouped = by.groupby(["task", "model", "mt", "method"])
    out = grouped["score"].agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "seeds"})
    out["languages"] = grouped["languages"].min().values
    out["std"] = out["std"].fillna(0.0)
    out["complete"] = [(languages is None or n >= languages) and (seeds is None or k >= seeds)
                       for n, k in zip(out["languages"], out["seeds"])]
    out["coverage"] = ["" if ok else ", ".join(filter(None, [
        f"{n}/{languages} langs" if languages and n < languages else "",
        f"{k}/{seeds} seeds" if seeds and k < seeds else ""])) for ok, n, k in zip(out["complete"], out["languages"], out["seeds"])]
    out["paper"] = [paper_value(t, m, me) for t, m, me in zip(out["task"], out["model"], out["method"])]
    out["difference"] = [mean - float(paper) if ok and not pd.isna(paper) else float("nan")
                         for mean, paper, ok in zip(out["mean"], out["paper"], out["complete"])]
    return out

def format_cell(mean: float, std: float, seeds: int, bold: bool, latex: bool, coverage: str = "") -> str:
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if seeds > 1 else "") + (f" ({coverage})" if coverage else "")
    if latex:
        text = text.replace("±", r"$\pm$")
        return rf"\textbf{{{text}}}" if bold else text
    return f"**{text}**" if bold else text

def paper_table(table: pd.DataFrame, latex: bool = False) -> str:
    """Methods x models: ours (the best complete method of each model in bold), the paper's
    number, the difference (complete cells only; an incomplete cell names its coverage)."""
    models = list(dict.fromkeys(table["model"]))
    header = ["method"]
    for model in models:
        header += [model, "paper", "Δ"]
    rows = []
    complete = table[table["complete"]] if "complete" in table else table
    best = complete.loc[complete.groupby("model")["mean"].idxmax(), ["model", "method"]].values.tolist()
    for method in method_order(set(table["method"])):
        row = [method.replace("_", r"\_") if latex else method]
        for model in models:
            hit = table[(table["model"] == model) & (table["method"] == method)]
            if hit.empty:
                row += ["–", "–", "–"]
                continue
            r = hit.iloc[0]
            row.append(format_cell(r["mean"], r["std"], int(r["seeds"]), [model, method] in best, latex, r.get("coverage", "")))
            row.append("–" if pd.isna(r["paper"]) else f"{r['paper']:.2f}")
            row.append("–" if pd.isna(r["difference"]) else f"{r['difference']:+.2f}")
        rows.append(row)
    if latex:
        lines = [r"\begin{tabular}{l" + "rrr" * len(models) + "}", r"\toprule",
                 " & ".join(h.replace("Δ", r"$\Delta$") for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(r) + r" \\" for r in rows]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"

def language_table(frame: pd.DataFrame, model: str, metric: str) -> str:
    """Methods x languages (mean over seeds) of one model, with the average over the languages
    every method has finished (named where that is not all of them: no average over other sets)."""
    part = frame[frame["model"] == model]
    pivot = part.pivot_table(index="method", columns="lang", values=metric, aggfunc="mean") * 100
    shared = [c for c in pivot.columns if pivot[c].notna().all()]
    average = "avg" if len(shared) == len(pivot.columns) else f"avg of {', '.join(shared)}"
    pivot[average] = pivot[shared].mean(axis=1) if shared else float("nan")
    pivot = pivot.reindex(method_order(pivot.index))
    header = ["method", *pivot.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = pivot.max(axis=0)
    for method, values in pivot.iterrows():
        cells = ["–" if pd.isna(v) else f"**{v:.2f}**" if v == best[c] else f"{v:.2f}" for c, v in values.items()]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines) + "\n"

def diagnostics_table(frame: pd.DataFrame, model: str) -> str:
    """Methods x languages of one model: the share of test outputs naming no label (a decoder's
    generations; %, mean over seeds) and the stage-1 model's English test score (%, mean over
    seeds): the two first suspects when methods order differently on another model. Where the
    official NusaX scoring read some gold as no label (a test prompt cut by its answer), the share
    of those items too (%, always scored wrong)."""
    part = frame[frame["model"] == model]
    shares = {"invalid": part.pivot_table(index="method", columns="lang", values="invalid_share", aggfunc="mean")}
    if "unread_gold" in part and part["unread_gold"].fillna(0).gt(0).any():
        unread = part.assign(unread_share=100 * part["unread_gold"] / part["n"])
        shares["unread gold"] = unread.pivot_table(index="method", columns="lang", values="unread_share", aggfunc="mean")
    methods = method_order(shares["invalid"].index)
    english = part.groupby("method")["english_score"].mean().mul(100)
    header = ["method", *[f"{lang} {name} %" for name, table in shares.items() for lang in table.columns],
              "stage-1 English"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        values = [v for table in shares.values() for v in table.reindex(methods).loc[method]]
        score = english.get(method)
        lines.append("| " + " | ".join([method, *("–" if pd.isna(v) else f"{v:.2f}" for v in values),
                                        "–" if score is None or pd.isna(score) else f"{score:.2f}"]) + " |")
    return "\n".join(lines) + "\n"
