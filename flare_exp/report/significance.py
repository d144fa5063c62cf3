"""One method against another on the same test examples: the paired bootstrap, per language and
averaged over languages (stratified)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from ..methods import TITLES
from ..metrics import macro_f1_rows, normalize_answer, official_label_reading, official_same, token_f1
from ..protocol import official_scoring


def _example_scores(path: Path, metric: str) -> tuple[list[str], np.ndarray, list]:
    """(ids, each example's score, the rows) of a run, scored as its results.json is: an official
    QA output by its token indices or its decoded texts; under the official NusaX scoring the gold
    read from the decoded texts and an output naming no label given its wrong class."""
    rows = [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    if metric == "exact_match":
        return ids, np.array([_exact_match(r) for r in rows]), None
    if metric == "f1":
        return ids, np.array([max(token_f1(r["prediction"] or "", g) for g in r["gold"]) for r in rows]), None
    config = OmegaConf.create(json.loads((path / "results.json").read_text())["config"])
    if config.get("protocol") is not None and official_scoring(config.protocol, config.task, config.model) == "last_word":
        labels = list(config.task.labels)
        gold, predicted = official_label_reading(rows, labels)
        rows = [{**r, "gold": g, "prediction": p} for r, g, p in zip(rows, gold, predicted)]
    return ids, np.array([float(r["prediction"] == r["gold"]) for r in rows]), rows


def _exact_match(row: dict) -> float:
    output = row.get("output")
    if isinstance(output, dict) and "gold_full" in output:  # the official decoder scoring
        return float(official_same(output["full"], output["gold_full"]))
    if isinstance(output, dict) and "start" in output:  # the official token indices
        return float([output["start"], output["end"]] == list(output["gold"]))
    return max(float(normalize_answer(row["prediction"] or "") == normalize_answer(g)) for g in row["gold"])

def _bootstrap(flare_dir: Path, lora_dir: Path, metric: str, draws: np.ndarray | None, rng) -> tuple:
    """(observed FLARE - LoRA, the differences over bootstrap resamples, n) on the same examples."""
    ids_f, scores_f, rows_f = _example_scores(flare_dir, metric)
    ids_l, scores_l, rows_l = _example_scores(lora_dir, metric)
    if ids_f != ids_l:
        raise ValueError(f"{flare_dir} and {lora_dir} scored different examples.")
    draws = rng.integers(0, len(ids_f), size=(draws, len(ids_f)))
    if metric == "macro_f1":  # over the task's labels, as results.json scores it
        labels = list(json.loads((flare_dir / "results.json").read_text())["config"]["task"]["labels"])
        labels += [None] if any(r["gold"] is None for r in rows_f) else []  # an unread official gold: a class
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

def significance_table(frame: pd.DataFrame, metric: str, samples: int = 1000, a: str = "flare", b: str = "lora") -> str:
    """Method ``a`` minus method ``b`` (FLARE minus LoRA by default) per language and, per (task,
    model, mt, seed), over the languages both finished (stratified by language)."""
    first, second = TITLES.get(a, a), TITLES.get(b, b)
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
