"""Evaluation-time English sources: what a method that reads English at test (FLARE, input
fusion, translate-test) is given instead of the English it was trained with, to measure how much
its score owes to that English.

* ``as_trained``: the English as the run had it (human under ``mt=gold``, else MT);
* ``noised``: the English with seeded word-level noise at ``rate`` (each word, with probability
  ``rate``, dropped, replaced by another word of the test English, or swapped with its right
  neighbour, one of the three at equal odds): a controlled stand-in for worse MT;
* ``mismatched``: the English of another test example (a fixed seeded derangement: no example
  keeps its own);
* ``target``: the target text itself in the English's place;
* ``empty``: empty texts.

Only the English changes; the target inputs are never touched.
"""

from __future__ import annotations

import random

MODES = ("as_trained", "noised", "mismatched", "target", "empty")


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (Sattolo's algorithm: one cycle)."""
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: never the element itself
        order[i], order[j] = order[j], order[i]
    return order


def noise_text(text: str, rate: float, rng: random.Random, vocabulary: list[str], counts: dict | None = None) -> str:
    """``text`` with each word, independently with probability ``rate``, dropped, replaced by a
    word of ``vocabulary`` or swapped with the word after it (``counts``: words seen and noised)."""
    words = text.split()
    actions = [rng.randrange(3) if rng.random() < rate else None for _ in words]
    if counts is not None:
        counts["words"] = counts.get("words", 0) + len(words)
        counts["noised"] = counts.get("noised", 0) + sum(a is not None for a in actions)
    words = [rng.choice(vocabulary) if a == 1 else w for w, a in zip(words, actions)]
    dropped = [a == 0 for a in actions]  # moves with its word
    for i, action in enumerate(actions[:-1]):
        if action == 2:
            words[i], words[i + 1] = words[i + 1], words[i]
            dropped[i], dropped[i + 1] = dropped[i + 1], dropped[i]
    return " ".join(w for w, gone in zip(words, dropped) if not gone)


def english_source(english: list[dict], targets: list[dict], fields: list[str], mode: str, rate: float = 0.0,
                   seed: int = 0) -> list[dict]:
    """The English the test forward reads under ``mode`` (a new list; ``english`` and ``targets``
    are left as they are). Ids and labels stay those of each example's own English."""
    if mode not in MODES:
        raise ValueError(f"Unknown source mode {mode!r}; choose one of {list(MODES)}.")
    if mode == "noised" and not 0 < rate <= 1:
        raise ValueError(f"source.rate must lie in (0, 1] for noised sources, got {rate}.")
    if mode == "as_trained":
        return [dict(ex) for ex in english]
    if mode == "mismatched":
        order = derangement(len(english), seed)
        return [{**ex, **{f: english[j][f] for f in fields}} for ex, j in zip(english, order)]
    if mode == "target":
        return [{**ex, **{f: t[f] for f in fields}} for ex, t in zip(english, targets)]
    if mode == "empty":
        return [{**ex, **{f: "" for f in fields}} for ex in english]
    vocabulary = sorted({w for ex in english for f in fields for w in ex[f].split()}) or [""]
    return [{**ex, **{f: noise_text(ex[f], rate, random.Random(f"{seed}-{i}-{f}"), vocabulary) for f in fields}}
            for i, ex in enumerate(english)]
