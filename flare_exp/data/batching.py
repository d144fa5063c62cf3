"""Batches of examples: length grouping, epoch order, moving a batch to a device (no torch import)."""

from __future__ import annotations

import random


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def example_length(example: dict) -> int:
    """Characters of an example's texts (its fields; not its id or label): the length key of
    length-grouped batches."""
    return sum(len(v) for k, v in example.items() if isinstance(v, str) and k not in ("id", "label"))


def length_grouped(indices: list[int], lengths: list[int], size: int, window: int = 8) -> list[list[int]]:
    """Batches of ``size`` from ``indices`` (already shuffled): each window of ``window`` batches is
    sorted by length before it is cut, so a batch holds examples of similar length and pads
    little, while the windows keep the shuffle's randomness."""
    batches = []
    for start in range(0, len(indices), size * window):
        block = sorted(indices[start:start + size * window], key=lambda i: lengths[i])
        batches.extend(chunks(block, size))
    return batches


def epoch_batches(order: list[int], lengths: list[int] | None, size: int, rng: random.Random):
    """One epoch's batches: a shuffle, then length-grouped with the batch order shuffled again
    (``lengths`` given: ``train.group_by_length``), or cut in shuffled order."""
    rng.shuffle(order)
    if lengths is None:
        return list(chunks(order, size))
    batches = length_grouped(order, lengths, size)
    rng.shuffle(batches)
    return batches
