"""The resumable training checkpoint: a job killed at any moment leaves one to resume from."""

from pathlib import Path
from unittest import mock

import pytest
import torch

from flare_exp.train import Checkpoint


def _state(weight: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_a_checkpoint_survives_a_kill_between_its_renames(tmp_path):
    checkpoint = Checkpoint(tmp_path / "checkpoint", every=2)
    checkpoint.save(*_state(1.0), {"step": 2})
    real_rename = Path.rename

    def killed_after_moving_the_old_one_aside(self, target):
        real_rename(self, target)
        if target.name.endswith(".previous"):
            raise KeyboardInterrupt  # the job dies here, before the new checkpoint moves in

    with mock.patch.object(Path, "rename", killed_after_moving_the_old_one_aside), pytest.raises(KeyboardInterrupt):
        checkpoint.save(*_state(2.0), {"step": 4})
    assert not checkpoint.folder.exists()

    model, optimizer, scheduler = _state(0.0)
    assert checkpoint.load(model, optimizer, scheduler) == {"step": 2}
    assert torch.equal(model.weight, torch.full((2, 3), 1.0))

    checkpoint.save(*_state(3.0), {"step": 6})  # the next save tidies up
    model, optimizer, scheduler = _state(0.0)
    assert checkpoint.load(model, optimizer, scheduler) == {"step": 6}
    assert torch.equal(model.weight, torch.full((2, 3), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    checkpoint.remove()
    assert list(tmp_path.iterdir()) == []
