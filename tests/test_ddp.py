"""The two-pass FLARE step under DistributedDataParallel: 2 CPU processes (gloo) give the same
loss and the same update as one process on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from flare_exp.data import load_examples

TRAIN = {"lr": 1e-2, "weight_decay": 0.0, "batch_size": 4, "grad_accum": 2, "epochs": 1, "max_steps": 2,
         "warmup_ratio": 0.0, "gradient_checkpointing": False}


def _setup(out_dir: str):
    from pathlib import Path

    from flare_exp.flare import FlareConfig, get_flare_model
    from helpers import demo_cfg, fresh_stage1
    from tiny import randomize_lora

    torch.manual_seed(0)
    cfg = demo_cfg("tiny-llama", "flare", Path(out_dir))
    setup, stage1 = fresh_stage1(cfg)
    flare = get_flare_model(stage1, FlareConfig(target_modules="all-linear"))
    randomize_lora(flare.peft_model, seed=3, scale=0.1)
    targets, english = load_examples("demo", "dmb", "train")[:16], load_examples("demo", "en", "train")[:16]
    return flare, setup.batcher, targets, english


def _train(out_dir: str, rank: int, world: int) -> None:
    """One two-pass FLARE step by hand (loss, DDP-averaged gradients), then train_model."""
    from torch.nn.parallel import DistributedDataParallel

    from flare_exp.train import accelerator_for, train_model

    flare, batcher, targets, english = _setup(out_dir)
    flare.train()
    runner = DistributedDataParallel(flare) if world > 1 else flare
    loss = runner(**batcher(targets[:8][rank::world], english[:8][rank::world])).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    result = {f"grad/{n}": p.grad.detach().clone() for n, p in flare.named_parameters() if p.requires_grad}
    result["loss"] = mean_loss
    flare.zero_grad(set_to_none=True)
    stats = train_model(flare, batcher, targets, english, OmegaConf.create(TRAIN), seed=0, device="cpu", desc="ddp")
    result["train_losses"] = torch.tensor([stats["first_epoch_loss"], stats["last_epoch_loss"]])
    # accelerate saw the launch: each rank ran its share of the batches, not all of them
    assert accelerator_for(OmegaConf.create(TRAIN), "cpu").num_processes == world
    if rank == 0:
        save_file(result, os.path.join(out_dir, "result.safetensors"))


def _worker(rank: int, world: int, out_dir: str, init_file: str) -> None:
    # What torchrun tells each process (accelerate reads the launch from the environment).
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train(out_dir, rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir()
    double.mkdir()
    _train(str(single), 0, 1)
    mp.spawn(_worker, args=(2, str(double), str(tmp_path / "init")), nprocs=2, join=True)
    one, two = load_file(str(single / "result.safetensors")), load_file(str(double / "result.safetensors"))
    assert one.keys() == two.keys() and len(one) > 10
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    grads = [n for n in one if n.startswith("grad/")]
    assert all(one[n].abs().sum() > 0 for n in grads)
    for name in grads:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-4, msg=name)
    # train_model under DDP, two micro-batches per optimizer step (gradients synchronised on the
    # second only): the same losses (float noise aside) over two optimizer steps.
    torch.testing.assert_close(two["train_losses"], one["train_losses"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_pipeline_matches_one_process(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import run_path

    root = Path(__file__).resolve().parent.parent
    args = ["model=tiny-bert", "task=demo", "mt=gold", "method=flare", "lang=dma", "data.max_train=48",
            "data.max_test=24", "train.epochs=1", "train.batch_size=16",
            "stage1.epochs=1", "stage1.batch_size=16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    for name, prefix in (("one", [sys.executable]), ("two", launcher)):
        done = subprocess.run([*prefix, str(root / "run.py"), *args, f"output_dir={tmp_path / name}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((run_path(tmp_path / n, "runs/demo/tiny-bert/gold/flare/dma/seed100") / "results.json")
                          .read_text()) for n in ("one", "two")]
    assert results[1]["metrics"] == results[0]["metrics"]
    assert results[1]["stage2_train"]["last_epoch_loss"] == pytest.approx(results[0]["stage2_train"]["last_epoch_loss"], abs=1e-5)
