"""Paper-shaped tables and plots from finished runs (results.json files); never trains.

    python -m flare_exp.tables experiment=paper_nusax [data.dir=...] [--out outputs/tables]

Writes, under ``<out>/<experiment>/``: ``table.{md,tex,csv}`` (methods x models, the average
over languages, mean +- std over seeds, the best method of each model in bold, the paper's
number and our difference beside it), ``languages_<model>.md`` (methods x languages),
``diagnostics_<model>.md`` (invalid outputs per language and the stage-1 English score),
``significance.md`` (FLARE vs LoRA, paired bootstrap over test examples),
``significance_input_fusion.md`` (input fusion vs FLARE, where both ran) and ``plots/*.png``.
Runs the experiment declares but that have not finished are listed, not trained.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .metrics import invalid_share, macro_f1_rows, normalize_answer, token_f1
from .paper_results import METHODS, paper_value
from .results import run_dir

CONF = Path(__file__).resolve().parent.parent / "conf"


# -- loading and naming results ----------------------------------------------------------------
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
    from .results import NOT_IDENTITY

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
        return (METHODS.index(base) if base in METHODS else len(METHODS), label)
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


# -- which runs an experiment declares -------------------------------------------------------
def split_experiment(overrides: list[str]) -> tuple[str, list[str]]:
    """(the one ``experiment=<name>`` among command-line overrides, the other overrides)."""
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if len(experiments) != 1:
        raise SystemExit("error: name exactly one experiment=<name>.")
    return experiments[0], [o for o in overrides if not o.startswith("experiment=")]


def sweep_params(experiment: str, overrides: list[str]) -> dict[str, list[str]]:
    """The sweep parameters of ``experiment`` (name -> values)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    return {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}


def sweep_configs(experiment: str, overrides: list[str]) -> list[tuple[dict, DictConfig]]:
    """(choices, composed config) of every job of ``experiment``'s sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    params = sweep_params(experiment, overrides)
    GlobalHydra.instance().clear()
    base = [f"experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [(choice, compose(config_name="config", overrides=[*base, *(f"{k}={v}" for k, v in choice.items())]))
                for choice in (dict(zip(params, values)) for values in itertools.product(*params.values()))]


def expected_runs(experiment: str, overrides: list[str]) -> list[tuple[dict, Path]]:
    """(choices, run directory) of every job of ``experiment``'s sweep."""
    return [(choice, run_dir(cfg)) for choice, cfg in sweep_configs(experiment, overrides)]


# -- aggregation ---------------------------------------------------------------------------
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
    seeds): the two first suspects when methods order differently on another model."""
    part = frame[frame["model"] == model]
    invalid = part.pivot_table(index="method", columns="lang", values="invalid_share", aggfunc="mean")
    invalid = invalid.reindex(method_order(invalid.index))
    english = part.groupby("method")["english_score"].mean().mul(100)
    header = ["method", *[f"{lang} invalid %" for lang in invalid.columns], "stage-1 English"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in invalid.iterrows():
        score = english.get(method)
        lines.append("| " + " | ".join([method, *("–" if pd.isna(v) else f"{v:.2f}" for v in values),
                                        "–" if score is None or pd.isna(score) else f"{score:.2f}"]) + " |")
    return "\n".join(lines) + "\n"

# -- FLARE vs LoRA, paired bootstrap -----------------------------------------------------------
def _example_scores(path: Path, metric: str) -> tuple[list[str], np.ndarray, list]:
    rows = [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    if metric == "exact_match":
        return ids, np.array([max(float(normalize_answer(r["prediction"] or "") == normalize_answer(g))
                                  for g in r["gold"]) for r in rows]), None
    if metric == "f1":
        return ids, np.array([max(token_f1(r["prediction"] or "", g) for g in r["gold"]) for r in rows]), None
    return ids, np.array([float(r["prediction"] == r["gold"]) for r in rows]), rows


def _bootstrap(flare_dir: Path, lora_dir: Path, metric: str, draws: np.ndarray | None, rng) -> tuple:
    """(observed FLARE - LoRA, the differences over bootstrap resamples, n) on the same examples."""
    ids_f, scores_f, rows_f = _example_scores(flare_dir, metric)
    ids_l, scores_l, rows_l = _example_scores(lora_dir, metric)
    if ids_f != ids_l:
        raise ValueError(f"{flare_dir} and {lora_dir} scored different examples.")
    draws = rng.integers(0, len(ids_f), size=(draws, len(ids_f)))
    if metric == "macro_f1":  # over the task's labels, as results.json scores it
        labels = list(json.loads((flare_dir / "results.json").read_text())["config"]["task"]["labels"])
        gold = np.array([r["gold"] for r in rows_f], dtype=object)
        pf = np.array([r["prediction"] for r in rows_f], dtype=object)
        pl = np.array([r["prediction"] for r in rows_l], dtype=object)
        observed = float(macro_f1_rows(gold[None], pf[None], labels)[0] - macro_f1_rows(gold[None], pl[None], labels)[0])
        diffs = macro_f1_rows(gold[draws], pf[draws], labels) - macro_f1_rows(gold[draws], pl[draws], labels)
    else:
        observed = float(scores_f.mean() - scores_l.mean())
        diffs = scores_f[draws].mean(1) - scores_l[draws].mean(1)
    return observed, diffs, len(ids_f)


def paired_bootstrap(flare_dir: Path, lora_dir: Path, metric: str, samples: int = 1000, seed: int = 0) -> dict:
    """FLARE minus LoRA on the same test examples, and the share of resamples in which FLARE is
    not better (a one-sided p-value)."""
    observed, diffs, n = _bootstrap(flare_dir, lora_dir, metric, samples, np.random.default_rng(seed))
    return {"difference": 100 * observed, "p_value": float((diffs <= 0).mean()), "n": n}


def averaged_bootstrap(pairs: list[tuple[Path, Path]], metric: str, samples: int = 1000, seed: int = 0) -> dict:
    """FLARE minus LoRA averaged over languages (one (FLARE, LoRA) pair of runs each), with a
    paired bootstrap stratified by language: each resample draws every language's test set anew."""
    rng = np.random.default_rng(seed)
    parts = [_bootstrap(f, l, metric, samples, rng) for f, l in pairs]
    diffs = np.mean([d for _, d, _ in parts], axis=0)
    return {"difference": 100 * float(np.mean([o for o, _, _ in parts])), "p_value": float((diffs <= 0).mean()),
            "n": sum(n for _, _, n in parts)}


def p_text(p: float, samples: int) -> str:
    """A p-value of the bootstrap, or "<1/samples" where no resample went the other way."""
    return f"<{1 / samples:.3f}" if p == 0 else f"{p:.3f}"


NAMES = {"flare": "FLARE", "lora": "LoRA", "input_fusion": "input fusion", "translate_test": "translate-test"}


def significance_table(frame: pd.DataFrame, metric: str, samples: int = 1000, a: str = "flare", b: str = "lora") -> str:
    """Method ``a`` minus method ``b`` (FLARE minus LoRA by default) per language and, per (task,
    model, mt, seed), over the languages both finished (stratified by language)."""
    first, second = NAMES.get(a, a), NAMES.get(b, b)
    lines = [f"| task | model | mt | lang | seed | {first} − {second} | p ({first} ≤ {second}) | n |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ["task", "model", "mt", "lang", "seed"]
    ours = frame[frame["method"] == a].set_index(keys)["run_dir"]
    theirs = frame[frame["method"] == b].set_index(keys)["run_dir"]
    both = sorted(set(ours.index) & set(theirs.index))
    for key in both:
        test = paired_bootstrap(Path(ours[key]), Path(theirs[key]), metric, samples)
        lines.append("| " + " | ".join(map(str, key)) +
                     f" | {test['difference']:+.2f} | {p_text(test['p_value'], samples)} | {test['n']} |")
    groups: dict[tuple, list] = {}
    for key in both:
        groups.setdefault(key[:3] + key[4:], []).append((Path(ours[key]), Path(theirs[key])))
    for (task, model, mt, seed), pairs in groups.items():
        if len(pairs) > 1:
            test = averaged_bootstrap(pairs, metric, samples)
            lines.append(f"| {task} | {model} | {mt} | average of {len(pairs)} | {seed} | {test['difference']:+.2f} | "
                         f"{p_text(test['p_value'], samples)} | {test['n']} |")
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------
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


# -- the command ------------------------------------------------------------------------------
def build(experiment: str, overrides: list[str], out: Path, samples: int = 1000) -> dict:
    jobs = expected_runs(experiment, overrides)
    finished = [d / "results.json" for _, d in jobs if (d / "results.json").is_file()]
    missing = [choice for choice, d in jobs if not (d / "results.json").is_file()]
    folder = out / experiment
    folder.mkdir(parents=True, exist_ok=True)
    report = {"experiment": experiment, "declared": len(jobs), "finished": len(finished), "missing": missing}
    if missing:
        print(f"{len(missing)} of {len(jobs)} runs of {experiment} have not finished (this command trains nothing):")
        for choice in missing[:20]:
            print("  " + " ".join(f"{k}={v}" for k, v in choice.items()))
        if len(missing) > 20:
            print(f"  ... and {len(missing) - 20} more (all in {folder / 'missing.json'})")
        (folder / "missing.json").write_text(json.dumps(missing, indent=1) + "\n")
    if not finished:
        return report
    frame = load_results(finished)
    metric = json.loads(finished[0].read_text())["headline_metric"]
    declared = {k: len({choice.get(k) for choice, _ in jobs}) if any(k in c for c, _ in jobs) else None
                for k in ("lang", "seed")}
    table = summary(frame, metric, declared["lang"], declared["seed"])
    table.to_csv(folder / "table.csv", index=False)
    markdown = paper_table(table)
    (folder / "table.md").write_text(markdown)
    (folder / "table.tex").write_text(paper_table(table, latex=True))
    for model in dict.fromkeys(frame["model"]):
        (folder / f"languages_{model}.md").write_text(language_table(frame, model, metric))
        (folder / f"diagnostics_{model}.md").write_text(diagnostics_table(frame, model))
    if {"flare", "lora"} <= set(frame["method"]):
        (folder / "significance.md").write_text(significance_table(frame, metric, samples))
    if {"flare", "input_fusion"} <= set(frame["method"]):  # FLARE's fair competitor: the same English, in the input
        (folder / "significance_input_fusion.md").write_text(significance_table(frame, metric, samples, "input_fusion", "flare"))
    report["plots"] = [str(p) for p in plot(frame, metric, folder / "plots")]
    print(f"{experiment}: {metric} (%), average over languages; written to {folder}\n")
    print(markdown)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Paper-shaped tables and plots from finished runs.")
    parser.add_argument("overrides", nargs="+", help="experiment=<name> and any Hydra overrides (data.dir=...)")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    experiment, rest = split_experiment(args.overrides)
    build(experiment, rest, args.out, args.samples)


if __name__ == "__main__":
    main()
