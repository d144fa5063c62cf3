"""Classification metrics and the parsing of generated labels (own code: no hub metrics)."""

from __future__ import annotations

import re

INVALID = None  # a generated output that names no label


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated text names: its first word, case and punctuation aside."""
    words = re.findall(r"\w+", text.lower())
    if not words:
        return INVALID
    by_name = {label.lower(): label for label in labels}
    return by_name.get(words[0], INVALID)


def accuracy(gold: list[str], predicted: list[str | None]) -> float:
    if not gold:
        raise ValueError("No examples to score.")
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: list[str], predicted: list[str | None], labels: list[str]) -> float:
    """Mean over ``labels`` of per-class F1 (0 for a class never predicted nor present);
    invalid predictions count as wrong for every class."""
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def classification_metrics(gold, predicted, labels) -> dict:
    return {
        "accuracy": accuracy(gold, predicted),
        "macro_f1": macro_f1(gold, predicted, labels),
        "n": len(gold),
        "invalid": sum(p is INVALID for p in predicted),
    }
