"""Stage 1: the English task adapter, trained once per (task, model, seed, settings, data) and
cached: the key, the lock that lets concurrent jobs share one training, training, loading."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model

from . import distributed
from .locking import file_lock
from .evaluate import predict, score
from .methods import lora_config, task_head
from .models import load_base_model
from .pairs import examples
from .results import config_hash, write_json_atomic
from .train import Checkpoint, train_model


def stage1_key(cfg: DictConfig) -> str:
    identity = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "stage1": {k: v for k, v in OmegaConf.to_container(cfg.stage1, resolve=True).items()
                   if k != "checkpoint_every"},
        "seed": cfg.seed,
        "data": {"dir": str(cfg.data.dir) if cfg.data.dir else None, "max_train": cfg.data.max_train},
    }
    return config_hash(identity, 12)


def stage1_dir(cfg: DictConfig) -> Path:
    return (Path(cfg.output_dir) / "stage1" / cfg.task.name / cfg.model.name
            / f"seed{cfg.seed}-{stage1_key(cfg)}")



def ensure_stage1(cfg: DictConfig, tokenizer, batcher, device) -> Path:
    """The stage-1 adapter directory, trained now unless cached.

    Concurrent jobs wait on a file lock, so exactly one trains; the adapter is written to a
    staging folder and renamed into place, so no reader sees half of it. Under data parallel,
    rank 0 holds the lock and decides, every rank trains, rank 0 writes.
    """
    final = stage1_dir(cfg)
    world, rank = distributed.world()
    lock = file_lock(final.with_name(final.name + ".lock")) if rank == 0 else contextlib.nullcontext()
    with lock:
        if distributed.broadcast((final / "stage1.json").is_file()):
            return final
        if rank == 0:
            print(f"Training stage 1 -> {final}", flush=True)
        english_train = examples(cfg, "en", "train")
        base = load_base(cfg, tokenizer, device)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, lora_config(cfg.model, cfg.stage1, task_head(cfg)))
        resume = Checkpoint(final.with_name(f".{final.name}.checkpoint"), int(cfg.stage1.checkpoint_every))
        stats = train_model(model, batcher, english_train, None, cfg.stage1, cfg.seed, device,
                            desc=f"stage 1 {cfg.task.name} en", checkpoint=resume)
        if rank == 0:
            english_test = examples(cfg, "en", "test")
            rows = predict(model, batcher, english_test, None, cfg.train.eval_batch_size, device,
                           cfg.task.max_new_tokens, desc="stage 1 English test", precision=cfg.stage1.get("autocast"))
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            model.save_pretrained(staging)  # safetensors
            write_json_atomic(staging / "stage1.json", {"train": stats, "english_test": score(rows, batcher),
                                                        "key": stage1_key(cfg)})
            if final.exists():  # a broken earlier attempt: no stage1.json inside
                shutil.rmtree(final)
            staging.rename(final)
        distributed.barrier()
        return final


def load_base(cfg: DictConfig, tokenizer, device):
    labels = list(cfg.task.labels) if cfg.task.labels else None
    return load_base_model(cfg.model, tokenizer, labels, device, Path(cfg.output_dir) / "cache", cfg.seed)


def load_stage1(cfg: DictConfig, path: Path, tokenizer, device) -> PeftModel:
    base = load_base(cfg, tokenizer, device)
    model = PeftModel.from_pretrained(base, path)  # loads adapter_model.safetensors
    model.eval()
    return model
