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


# -- SQuAD v1.1 exact match and F1 -------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = None


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no English articles, single spaces."""
    global _PUNCTUATION
    if _PUNCTUATION is None:
        import string

        _PUNCTUATION = set(string.punctuation)
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    from collections import Counter

    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(predicted) & Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: list[str | None], answers: list[list[str]]) -> dict:
    """SQuAD v1.1 exact match and F1 (max over the gold answers of each question), in [0, 1].
    A missing prediction (None) scores 0 and is counted as invalid."""
    if not answers:
        raise ValueError("No questions to score.")
    em = f1 = 0.0
    for prediction, golds in zip(predictions, answers, strict=True):
        if prediction is None:
            continue
        em += max(exact_match(prediction, g) for g in golds)
        f1 += max(token_f1(prediction, g) for g in golds)
    return {"exact_match": em / len(answers), "f1": f1 / len(answers), "n": len(answers),
            "invalid": sum(p is None for p in predictions)}
