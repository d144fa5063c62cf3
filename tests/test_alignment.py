"""Alignment maps (spec D5, D6) against hand-written maps and an independent loop reference."""

import pytest
import torch

from flare_exp.flare import build_source_index, gather_aligned, last_source_position
from helpers import reference_index  # the loop-by-loop reading of spec section 4


def masks(lengths, width, side):
    m = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            m[b, width - n :] = 1
        else:
            m[b, :n] = 1
    return m


def test_right_padded_position_start_by_hand():
    target = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    source = torch.tensor([[1, 1, 0], [1, 1, 1]])
    index = build_source_index(target, source, "position", "start")
    assert index.tolist() == [[0, 1, -1, -1, -1], [0, 1, -1, -1, -1]]


def test_left_padded_position_end_by_hand():
    target = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    source = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    index = build_source_index(target, source, "position", "end")
    # Ends of the prompts meet: the last target token fuses the last source token.
    assert index.tolist() == [[-1, -1, 2, 3], [-1, 1, 2, 3]]


def test_answer_tokens_map_to_last_source_position():
    target = torch.tensor([[1, 1, 1, 1, 0]])  # two prompt tokens, two answer tokens, one pad
    source = torch.tensor([[0, 1, 1]])
    index = build_source_index(target, source, "position", "end", target_prompt_lengths=torch.tensor([2]))
    assert index.tolist() == [[1, 2, 2, 2, -1]]


def test_proportional_by_hand():
    target = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    source = torch.tensor([[1, 1, 1, 0]])
    index = build_source_index(target, source, "proportional")
    # round(i * 3 / 6) with halves rounding up: 0, 0.5, 1, 1.5, 2, 2.5 -> 0, 1, 1, 2, 2, 3 -> clipped to 2
    assert index.tolist() == [[0, 1, 1, 2, 2, 2, -1, -1]]


def test_unmasked_mode_reproduces_position_by_position():
    target = torch.tensor([[1, 1, 1, 0, 0]])
    source = torch.tensor([[1, 0, 0]])
    index = build_source_index(target, source, mask_source_padding=False)
    assert index.tolist() == [[0, 1, 2, -1, -1]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("strategy", ["position", "proportional"])
@pytest.mark.parametrize("anchor", ["start", "end"])
def test_matches_loop_reference(side, strategy, anchor):
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        batch = 4
        t_len = torch.randint(1, 12, (batch,), generator=gen).tolist()
        s_len = torch.randint(1, 12, (batch,), generator=gen).tolist()
        target = masks(t_len, 12, side)
        source = masks(s_len, 12 + trial % 3, side)
        prompt = torch.tensor([torch.randint(1, n + 1, (1,), generator=gen).item() for n in t_len])
        for prompts in (None, prompt):
            got = build_source_index(target, source, strategy, anchor, target_prompt_lengths=prompts)
            assert torch.equal(got, reference_index(target, source, strategy, anchor, prompts))
            # Only real source tokens are ever fused.
            valid = got >= 0
            assert bool(source.gather(1, got.clamp(min=0))[valid].all())
            assert not bool(valid[target == 0].any())


def test_masked_positions_get_zero_source():
    states = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4) + 1
    index = torch.tensor([[2, -1, 0], [-1, -1, 1]])
    out = gather_aligned(states, index)
    assert torch.equal(out[0, 0], states[0, 2])
    assert torch.equal(out[0, 2], states[0, 0])
    assert torch.equal(out[1, 2], states[1, 1])
    assert torch.count_nonzero(out[0, 1]) == 0 and torch.count_nonzero(out[1, :2]) == 0


def test_last_source_position():
    assert last_source_position(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist() == [2, 1]


def test_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch size"):
        build_source_index(torch.ones(2, 3), torch.ones(3, 3))
