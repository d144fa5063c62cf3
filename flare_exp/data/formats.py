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


def fuse_in_template(targets: list[dict], english: list[dict], template: str, first: str, second: str) -> list[dict]:
    """Input fusion of a two-field task as the official code writes it: the English example in
    ``template``, a space, then the target example in it ("Premise: en_p Hypothesis: en_h Premise:
    tgt_p Hypothesis: tgt_h"), carried by the fields so that ``template`` renders exactly that:
    ``first`` holds everything up to the target's ``second``."""
    prefix, rest = template.split("{" + first + "}", 1)
    between = rest.split("{" + second + "}", 1)[0]
    return [{**target, first: source[first] + between + source[second] + " " + prefix + target[first]}
            for target, source in zip(targets, english, strict=True)]


def with_english(targets: list[dict], english: list[dict], fields: list[str]) -> list[dict]:
    """Each target example with its English fields beside its own, as ``en_<field>`` (for a
    prompt that names both: the official TyDiQA input fusion of decoders)."""
    return [{**target, **{f"en_{f}": source[f] for f in fields}} for target, source in zip(targets, english, strict=True)]
