"""Classification metrics and the parsing of generated labels (own code: no hub metrics)."""

from __future__ import annotations

import re

import numpy as np

INVALID = None  # a generated output that names no label


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated text names: its first word, case and punctuation aside."""
    words = re.findall(r"\w+", text.lower())
    if not words:
        return INVALID
    by_name = {label.lower(): label for label in labels}
    return by_name.get(words[0], INVALID)


# -- the official code's scoring of generated text (tasks/*.py, compute_metrics_generate) ---------
_ARTEFACT = re.compile(r"://.*")  # to the line's end: "." spans no newline


def official_cut(text: str) -> str:
    """A decoded text as the official code reads it: everything from "://" to the line's end
    removed (its "generation artifacts in llama")."""
    return _ARTEFACT.sub("", text)


def official_same(prediction: str, gold: str) -> bool:
    """The official exact match of two decoded texts (prompt and output against prompt and gold):
    both cut (``official_cut``), then equal ignoring case and ASCII punctuation (the hub metric's
    ignore_case and ignore_punctuation)."""
    import string

    table = str.maketrans("", "", string.punctuation)
    return official_cut(prediction).lower().translate(table) == official_cut(gold).lower().translate(table)


def last_word_label(text: str, labels: list[str]) -> str | None:
    """The label the official NusaX scoring reads in a decoded prompt and output: its last word
    after ``official_cut``, as written (no case or punctuation aside), or None."""
    words = official_cut(text).split()
    return words[-1] if words and words[-1] in labels else INVALID


def forced_label(gold: str, labels: list[str]) -> str:
    """The class the official NusaX scoring gives an output that names no label: the second where
    the gold is the first (neutral for negative), else the first (negative): always wrong."""
    return labels[1] if gold == labels[0] else labels[0]


def official_label_reading(rows: list[dict], labels: list[str]) -> tuple[list, list]:
    """(gold, predicted) of prediction rows as the official NusaX scoring reads them: the gold is
    ``last_word_label`` of the decoded prompt and gold answer (``output["gold_full"]``), None where a
    prompt cut by its answer's length glued the answer to its last word ("Sentimentpositive"); a
    prediction naming no label is given ``forced_label`` of that gold. A row whose output has no
    decoded texts reads its own gold."""
    gold = [last_word_label(r["output"]["gold_full"], labels) if isinstance(r["output"], dict) else r["gold"]
            for r in rows]
    predicted = [r["prediction"] if r["prediction"] is not None else forced_label(g, labels)
                 for r, g in zip(rows, gold)]
    return gold, predicted


def official_label_metrics(rows: list[dict], labels: list[str]) -> dict:
    """The official NusaX scoring (tasks/nusax.py, compute_metrics_generate) of ``rows``: accuracy
    and macro-F1 of ``official_label_reading``, the F1 averaged over the classes present in the
    gold or the predictions (scikit-learn's default), an unread gold (None) one of them; counts of
    outputs naming no label (``invalid``) and of golds read as none (``unread_gold``)."""
    gold, predicted = official_label_reading(rows, labels)
    present = [l for l in labels if l in gold or l in predicted] + ([INVALID] if INVALID in gold else [])
    return {"accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted, present), "n": len(rows),
            "invalid": sum(r["prediction"] is INVALID for r in rows), "unread_gold": gold.count(INVALID)}


def official_qa_metrics(outputs: list[dict]) -> dict:
    """The official exact match of a generative model's QA answers (tasks/tydiqa.py,
    compute_metrics_generate): ``official_same`` of each output's decoded prompt and answer
    (``full``) and its decoded prompt and gold answer (``gold_full``), in [0, 1]; it has no F1."""
    if not outputs:
        raise ValueError("No questions to score.")
    hits = sum(official_same(o["full"], o["gold_full"]) for o in outputs)
    return {"exact_match": hits / len(outputs), "n": len(outputs), "invalid": 0}


def accuracy(gold: list[str], predicted: list[str | None]) -> float:
    if not gold:
        raise ValueError("No examples to score.")
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: list[str], predicted: list[str | None], labels: list[str]) -> float:
    """Mean over the task's ``labels`` of per-class F1 (0 for a class never predicted nor
    present); invalid predictions count as wrong for every class."""
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length.")
    return float(macro_f1_rows(np.array([gold], dtype=object), np.array([predicted], dtype=object), labels)[0])


def macro_f1_rows(gold: np.ndarray, predicted: np.ndarray, labels: list[str]) -> np.ndarray:
    """``macro_f1`` of every row of two (rows x examples) arrays at once (bootstrap resamples)."""
    scores = []
    for label in labels:
        tp = ((gold == label) & (predicted == label)).sum(1)
        fp = ((gold != label) & (predicted == label)).sum(1)
        fn = ((gold == label) & (predicted != label)).sum(1)
        denominator = 2 * tp + fp + fn
        scores.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
    return np.mean(scores, axis=0)


def classification_metrics(gold, predicted, labels) -> dict:
    return {
        "accuracy": accuracy(gold, predicted),
        "macro_f1": macro_f1(gold, predicted, labels),
        "n": len(gold),
        "invalid": sum(p is INVALID for p in predicted),
    }


def invalid_share(metrics: dict) -> float:
    """The share (%) of a run's outputs that named no label (0 where none are counted)."""
    return 100 * metrics.get("invalid", 0) / metrics["n"]


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


def token_index_metrics(outputs: list[dict]) -> dict:
    """The official code's exact match of an encoder's QA answers (tasks/tydiqa.py,
    compute_metrics_cls): the argmax start and end token indices both equal to the gold ones
    (``{"start", "end", "gold": [start, end]}`` each), in [0, 1]; it has no F1."""
    if not outputs:
        raise ValueError("No questions to score.")
    hits = sum([o["start"], o["end"]] == list(o["gold"]) for o in outputs)
    return {"exact_match": hits / len(outputs), "n": len(outputs), "invalid": 0}
