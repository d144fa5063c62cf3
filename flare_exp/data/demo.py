"""The offline demo task: 3-class sentiment in English and two invented parallel languages.

Generated deterministically, no downloads. Every English word has a fixed invented counterpart
(syllable strings an English tokenizer splits into pieces); ``dma`` keeps English word order,
``dmb`` also reverses it. A model fine-tuned on English meets words it has never seen, so the
zero-shot transfer gap is real, and the English versions give FLARE and translate-test their
source text.
"""

from __future__ import annotations

import random

LABELS = ("negative", "neutral", "positive")
LANGUAGES = ("en", "dma", "dmb")
SIZES = {"train": 600, "validation": 100, "test": 300}

_ADJECTIVES = {
    "positive": "good great wonderful excellent lovely pleasant fantastic delightful superb enjoyable "
    "brilliant charming",
    "negative": "bad terrible awful horrible poor boring disappointing dreadful nasty annoying "
    "dull unpleasant",
    "neutral": "ordinary average typical standard normal usual plain regular moderate common "
    "acceptable fair",
}
_SUBJECTS = (
    "movie food hotel service book concert room staff trip game song meal show class phone car "
    "museum park"
).split()
_INTENSIFIERS = "very quite really rather truly so".split()
_TEMPLATES = (
    "the {s} was {i} {a}",
    "i think the {s} is {a}",
    "our {s} felt {i} {a} today",
    "honestly the {s} seemed {a}",
    "my friends said the {s} was {a}",
    "this {s} is {i} {a} overall",
)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _lexicon(seed: int) -> dict[str, str]:
    words = sorted(
        {w for t in _TEMPLATES for w in t.split() if not w.startswith("{")}
        | set(_SUBJECTS)
        | set(_INTENSIFIERS)
        | {w for v in _ADJECTIVES.values() for w in v.split()}
    )
    rng = random.Random(seed)
    used: set[str] = set()
    lexicon = {}
    for word in words:
        while True:
            invented = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
            if invented not in used:
                used.add(invented)
                lexicon[word] = invented
                break
    return lexicon


def _english(split: str) -> list[tuple[str, str]]:
    rng = random.Random(f"demo-{split}")
    rows = []
    for i in range(SIZES[split]):
        label = LABELS[i % 3]
        adjective = rng.choice(_ADJECTIVES[label].split())
        template = rng.choice(_TEMPLATES)
        text = template.format(s=rng.choice(_SUBJECTS), i=rng.choice(_INTENSIFIERS), a=adjective)
        rows.append((text, label))
    return rows


def translate(text: str, language: str) -> str:
    """The invented language's version of an English demo sentence."""
    if language == "en":
        return text
    if language not in LANGUAGES:
        raise ValueError(f"The demo task has languages {LANGUAGES}, not {language!r}.")
    lexicon = _lexicon(seed=7)
    words = [lexicon[w] for w in text.split()]
    if language == "dmb":
        words.reverse()
    return " ".join(words)


def load_demo(language: str, split: str) -> list[dict]:
    """Examples ``{"id", "text", "label"}``; row i of every language is the same sentence."""
    if split not in SIZES:
        raise ValueError(f"The demo task has splits {tuple(SIZES)}, not {split!r}.")
    return [
        {"id": f"demo-{split}-{i}", "text": translate(text, language), "label": label}
        for i, (text, label) in enumerate(_english(split))
    ]
