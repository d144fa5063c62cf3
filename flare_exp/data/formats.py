"""Input formats that combine the English and the target version of an example (no torch)."""

from __future__ import annotations

SEPARATOR = " || "  # between the English and the target text under input-level fusion


def concatenate_inputs(targets: list[dict], english: list[dict], fields: list[str], qa: bool,
                       separator: str = SEPARATOR) -> list[dict]:
    """Input-level fusion: every text field holds the English text, ``separator``, then the target
    text (QA answer offsets move with the context)."""
    fused = []
    for target, source in zip(targets, english, strict=True):
        example = dict(target)
        for field in fields:
            example[field] = source[field] + separator + target[field]
        if qa:
            shift = len(source["context"]) + len(separator)
            example["answers"] = [{**a, "answer_start": a["answer_start"] + shift} for a in target["answers"]]
        fused.append(example)
    return fused
