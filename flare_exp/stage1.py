"""Stage 1: the English task adapter, trained once per (task, model, seed, settings, data) and
cached (``flare_exp.record.stage1_dir``): the lock that lets concurrent jobs share one training,
the atomic write, loading."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from peft import PeftModel

from . import distributed
from .locking import file_lock
from .record import STAGE1_RECORD, write_json_atomic

# The base model's own parameters stage 1 trained (the official code's LM head and embeddings:
# protocol.decoder_lm_head, protocol.llama_pad_token), beside the adapter.
BASE_WEIGHTS = "base_weights.safetensors"


def trained_base_weights(model) -> dict:
    """The trainable parameters of ``model`` that are the base model's own, not its adapters'."""
    from .train import trainable_weights

    return {n: w for n, w in trainable_weights(model).items() if ".lora_" not in n and ".modules_to_save." not in n}


def ensure_stage1(final: Path, train: Callable[[], tuple[PeftModel, Callable[[], dict] | None]]) -> PeftModel | None:
    """The stage-1 model trained now by ``train()`` where ``final`` holds none yet (None where it
    does: load it). ``train`` returns the trained model and, on the process that writes, the
    function that scores it for the record (else None).

    Concurrent jobs wait on a file lock, so exactly one trains; the adapter is written to a
    staging folder and renamed into place, so no reader sees half of it. Under data parallel,
    rank 0 holds the lock and decides, every rank trains, rank 0 writes.
    """
    _, rank = distributed.world()
    lock = file_lock(final.with_name(final.name + ".lock")) if rank == 0 else contextlib.nullcontext()
    with lock:
        if distributed.broadcast((final / STAGE1_RECORD).is_file()):
            return None
        if rank == 0:
            print(f"Training stage 1 -> {final}", flush=True)
        model, record = train()
        if record is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            model.save_pretrained(staging)  # safetensors
            if base := trained_base_weights(model):
                from safetensors.torch import save_file

                save_file(base, str(staging / BASE_WEIGHTS))
            write_json_atomic(staging / STAGE1_RECORD, record())
            if final.exists():  # a broken earlier attempt: no stage1.json inside
                shutil.rmtree(final)
            staging.rename(final)
        distributed.barrier()
    frozen(model)
    return model


def frozen(model: PeftModel) -> PeftModel:
    """``model`` as a loaded stage 1 is: every parameter frozen, in evaluation mode."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def load_stage1(base, path: Path) -> PeftModel:
    """The stage-1 adapter in ``path`` on ``base`` (adapter_model.safetensors; the base's own
    trained parameters from ``BASE_WEIGHTS`` where stage 1 trained some), frozen."""
    model = PeftModel.from_pretrained(base, path)
    if (path / BASE_WEIGHTS).is_file():
        from safetensors.torch import load_file

        from .train import copy_into

        copy_into(model, load_file(str(path / BASE_WEIGHTS)))
    return model.eval()
