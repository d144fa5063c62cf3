"""Alignment of target positions to source positions (spec section 4, decisions D5 and D6).

A batch carries ``source_index`` (batch x target length, int64): for every target position the
index of the source position whose state it fuses with, or ``-1`` for none (S = 0 there).
Both sides may be left- or right-padded: each row's real tokens are the positions where the
attention mask is 1, and they are assumed contiguous.
"""

from __future__ import annotations

import torch

STRATEGIES = ("position", "proportional")
ANCHORS = ("start", "end")


def _span(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First real position and number of real positions of each row of a 0/1 mask."""
    mask = mask.long()
    length = mask.sum(dim=1)
    first = torch.where(length > 0, mask.argmax(dim=1), torch.zeros_like(length))
    return first, length


def build_source_index(
    target_mask: torch.Tensor,
    source_mask: torch.Tensor,
    strategy: str = "position",
    anchor: str = "start",
    target_prompt_lengths: torch.Tensor | None = None,
    mask_source_padding: bool = True,
) -> torch.Tensor:
    """Map every target position to a source position (or -1).

    Args:
        target_mask: batch x Lt attention mask of the target input.
        source_mask: batch x Ls attention mask of the source (English) input.
        strategy: ``position`` aligns positions one to one from ``anchor``; ``proportional`` maps
            prompt position i of Lt prompt tokens to round(i * Ls / Lt) (halves round up).
        anchor: ``start`` aligns the first real tokens (encoders); ``end`` aligns the last prompt
            tokens (decoders, whose prompt ends where generation starts).
        target_prompt_lengths: number of prompt tokens of each target row (its first real
            tokens). Real tokens after the prompt (answer tokens under teacher forcing) map to
            the last source position, which is what a decoding step sees at generation time.
            Default: the whole target is prompt.
        mask_source_padding: with False, the behaviour of the public reference code, which pads
            both sides to one fixed width and fuses position i with position i, padding
            included: both tensors are placed as if padded to one common width on their own
            padding side (left padding aligns their ends, right padding their starts) and
            position i of that width meets position i. Target positions that fall outside the
            source tensor get no source (the reference code, padding to its fixed width, would
            fuse the state of a source padding token there). Prompt lengths are not used.

    Returns:
        batch x Lt int64 tensor of source positions, -1 where there is none.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown alignment strategy {strategy!r}; choose one of {STRATEGIES}.")
    if anchor not in ANCHORS:
        raise ValueError(f"Unknown alignment anchor {anchor!r}; choose one of {ANCHORS}.")
    if target_mask.shape[0] != source_mask.shape[0]:
        raise ValueError(
            f"Target batch size {target_mask.shape[0]} differs from source batch size "
            f"{source_mask.shape[0]}: every target example needs its source example."
        )
    device = target_mask.device
    batch, target_len = target_mask.shape
    source_len = source_mask.shape[1]
    positions = torch.arange(target_len, device=device).expand(batch, target_len)
    none = torch.full_like(positions, -1)
    if not mask_source_padding:
        index = positions + _common_width_shift(target_mask, source_mask, anchor)
        return torch.where((index >= 0) & (index < source_len), index, none)

    t_first, t_len = _span(target_mask)
    s_first, s_len = _span(source_mask.to(device))
    prompt_len = t_len if target_prompt_lengths is None else target_prompt_lengths.to(device).long()
    if bool((prompt_len > t_len).any()):
        raise ValueError("A target prompt length exceeds the number of real target tokens.")

    k = positions - t_first[:, None]  # offset inside the real target tokens
    t_len, s_len, s_first, prompt_len = (v[:, None] for v in (t_len, s_len, s_first, prompt_len))
    in_prompt = (k >= 0) & (k < prompt_len)
    in_answer = (k >= prompt_len) & (k < t_len)

    if strategy == "position":
        if anchor == "start":
            offset = k
        else:
            offset = s_len - prompt_len + k  # the last prompt token meets the last source token
    else:
        # floor(x + 1/2) in integer arithmetic: halves round up, no banker's rounding.
        offset = torch.div(2 * k * s_len + prompt_len, 2 * prompt_len.clamp(min=1), rounding_mode="floor")
        offset = offset.clamp(max=s_len - 1)
    valid = in_prompt & (offset >= 0) & (offset < s_len)
    index = torch.where(valid, s_first + offset, none)
    last_source = s_first + s_len - 1
    index = torch.where(in_answer & (s_len > 0), last_source.expand_as(index), index)
    return index


def _pads_left(mask: torch.Tensor) -> bool | None:
    """True for a left-padded batch, False for a right-padded one, None where no row shows it."""
    first_real, last_real = bool(mask[:, 0].bool().all()), bool(mask[:, -1].bool().all())
    return None if first_real == last_real else last_real


def _common_width_shift(target_mask: torch.Tensor, source_mask: torch.Tensor, anchor: str) -> int:
    """Source index minus target index when both tensors are padded to one common width, each on
    its own padding side (read from the masks; from the other side, then the anchor, when a
    tensor has no padding)."""
    target_left, source_left = _pads_left(target_mask), _pads_left(source_mask)
    if target_left is None:
        target_left = source_left if source_left is not None else anchor == "end"
    if source_left is None:
        source_left = target_left
    target_len, source_len = target_mask.shape[1], source_mask.shape[1]
    width = max(target_len, source_len)
    return (width - target_len if target_left else 0) - (width - source_len if source_left else 0)


def prompt_lengths(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Real tokens before each row's first label that is not -100 (a causal batch's prompt)."""
    real = attention_mask.bool()
    answer = (labels != -100) & real
    first = torch.where(answer.any(1), answer.int().argmax(1), labels.shape[1])  # first answer position
    before = torch.arange(labels.shape[1], device=labels.device)[None, :] < first[:, None]
    return (before & real).sum(1)


def last_source_position(source_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real source token of each row (the state every decoding step fuses)."""
    first, length = _span(source_mask)
    return first + length - 1


def gather_aligned(states: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """Gather batch x Ls x r source states to batch x Lt x r through ``source_index``; -1 gives 0."""
    if states.shape[0] != source_index.shape[0]:
        raise ValueError(
            f"Source states have batch size {states.shape[0]} but the alignment map has "
            f"{source_index.shape[0]}."
        )
    valid = source_index >= 0
    safe = source_index.clamp(min=0)
    gathered = torch.gather(states, 1, safe.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
    return gathered * valid.unsqueeze(-1).to(gathered.dtype)
