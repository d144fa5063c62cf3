"""One training recipe for stage 1 and stage 2.

A plain loop (AdamW, linear schedule with warm-up, gradient accumulation), so that the two-pass
FLARE step is visible in one place: the model is a PEFT model (stage 1, LoRA stage 2) or a
``FlareModel``, and a batch carries the English source only when the model fuses it. accelerate
carries what depends on the hardware: mixed precision (``autocast``), the data-parallel wrapper
under ``torchrun`` / ``accelerate launch``, gradient sync on the last micro-batch of a step only,
loss reduction across ranks and gradient clipping (unscaled first under float16).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .data.batching import epoch_batches, example_length, to_device
from .flare.alignment import prompt_lengths
from .flare.calls import enable_gradient_checkpointing

PRECISIONS = {None: "no", "bfloat16": "bf16", "float16": "fp16"}


def trainable_weights(model) -> dict:
    """The model's trainable parameters (name -> a contiguous copy on the CPU)."""
    return {n: p.detach().contiguous().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def copy_into(model, weights: dict) -> None:
    """Load ``weights`` (name -> tensor) into the model's parameters of those names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


@dataclass
class Validation:
    """Model selection: ``score()`` (the task's metric on validation data, higher is better) is
    taken every ``every`` optimizer steps (None: a tenth of training) and at the last step;
    ``select`` is ``best`` (the best-scoring adapter is restored at the end) or ``last``."""

    score: Callable[[], float]
    every: int | None = None
    select: str = "best"

    def __post_init__(self):
        if self.select not in ("best", "last"):
            raise ValueError(f"Unknown model selection {self.select!r} (best or last).")


class _Selection:
    """The validation curve and the best adapter so far (trainable parameters, on the CPU)."""

    def __init__(self, validation: Validation | None, total: int, saved: dict | None, best: dict | None,
                 official: bool = False):
        self.validation = validation
        # the official code (transformers' Trainer): every max(total // 10, 1) steps, and at the
        # last step only where it is one of those
        tenth = max(1, total // 10) if official else max(1, round(total / 10))
        self.every = (validation.every or tenth) if validation else 0
        self.at_last = not official
        saved = saved or {"curve": [], "best_step": None, "best_score": None}
        self.curve, self.best_step, self.best_score = saved["curve"], saved["best_step"], saved["best_score"]
        self.best = best

    def after_step(self, model, step: int, total: int) -> float | None:
        """The validation score when this step validates, else None."""
        if not self.validation or (step % self.every and (step < total or not self.at_last)):
            return None
        model.eval()
        score = float(self.validation.score())
        model.train()
        self.curve.append({"step": step, "score": score})
        if self.validation.select == "best" and (self.best_score is None or score > self.best_score):
            self.best_step, self.best_score = step, score
            self.best = trainable_weights(model)
        return score

    def state(self) -> dict:
        return {"curve": self.curve, "best_step": self.best_step, "best_score": self.best_score}

    def finish(self, model, step: int) -> dict:
        """Restore the selected adapter; the curve and the selected step for the record."""
        if not self.validation:
            return {}
        if self.validation.select == "best" and self.best is not None:
            copy_into(model, self.best)
        selected = self.best_step if self.validation.select == "best" else step
        return {"validation": self.curve, "selected_step": selected, "selection": self.validation.select}


class Checkpoint:
    """The resumable state of a training run in ``folder``: the trainable parameters
    (safetensors), optimizer, scheduler and RNG states and the position in the data (written by
    this job and read back only by it; ``weights_only`` loading, no arbitrary pickles)."""

    def __init__(self, folder: Path | None, every: int):
        self.folder, self.every = folder, every

    @property
    def enabled(self) -> bool:
        return self.folder is not None and self.every > 0

    def _aside(self, label: str) -> Path:
        return self.folder.with_name(f"{self.folder.name}.{label}")

    def save(self, model, optimizer, scheduler, position: dict, best: dict | None = None) -> None:
        if not self.enabled:
            return
        staging, previous = self._aside("writing"), self._aside("previous")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(trainable_weights(model), str(staging / "trainable.safetensors"))
        if best is not None:  # the best adapter of the model selection so far
            save_file({n: v.contiguous() for n, v in best.items()}, str(staging / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "position": position}, staging / "state.pt")
        # The last checkpoint moves aside before the new one moves in: a job killed at any
        # moment leaves a complete checkpoint on disk.
        shutil.rmtree(previous, ignore_errors=True)
        if self.folder.exists():
            self.folder.rename(previous)
        staging.rename(self.folder)
        shutil.rmtree(previous, ignore_errors=True)

    def load(self, model, optimizer, scheduler) -> tuple[dict | None, dict | None]:
        """(position, best adapter of the selection) of the saved state, or (None, None)."""
        if not self.enabled:
            return None, None
        folder = next((f for f in (self.folder, self._aside("previous")) if (f / "state.pt").is_file()), None)
        if folder is None:
            return None, None
        copy_into(model, load_file(str(folder / "trainable.safetensors")))
        state = torch.load(folder / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        best = folder / "best.safetensors"
        return state["position"], load_file(str(best)) if best.is_file() else None

    def remove(self) -> None:
        if self.folder is not None:
            for folder in (self.folder, self._aside("writing"), self._aside("previous")):
                shutil.rmtree(folder, ignore_errors=True)


def _optimization(model, train_cfg, examples: int):
    """(trainable parameters, AdamW (``optimizer``: adamw or adamw_8bit), linear schedule with
    warm-up, total optimizer steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters.")
    name = train_cfg.get("optimizer") or "adamw"
    if name == "adamw_8bit":  # bitsandbytes' 8-bit AdamW (the official code's, for decoders)
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay))
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay))
    else:
        raise ValueError(f"Unknown optimizer {name!r} (adamw or adamw_8bit).")
    total, warmup = schedule(train_cfg, examples)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    return params, optimizer, scheduler, total


def schedule(train_cfg, examples: int) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) of training on ``examples``. ``schedule: per_epoch``:
    ceil(N / (B * accumulation)) steps an epoch, the warm-up rounded down; ``official`` (the
    official code's, transformers' Trainer): N * E // B // accumulation steps (B at most N), the
    warm-up rounded up. ``max_steps`` overrides the epochs in both."""
    batch, accum, epochs = int(train_cfg.batch_size), int(train_cfg.grad_accum), int(train_cfg.epochs)
    official = train_cfg.get("schedule", "per_epoch") == "official"
    if train_cfg.max_steps:
        total = int(train_cfg.max_steps)
    elif official:
        total = max(examples * epochs // min(batch, examples) // accum, 1)
    else:
        total = math.ceil(examples / (batch * accum)) * epochs
    ratio = float(train_cfg.warmup_ratio)
    return total, math.ceil(total * ratio) if official else int(total * ratio)


def accelerator_for(train_cfg, device):
    """The ``Accelerator`` of one training run: mixed precision ``train_cfg.autocast`` (bfloat16,
    float16 or None) on ``device``'s type, data parallel when a launcher started several
    processes. accelerate keeps one state per process and refuses to change its precision or
    device; stages or tests of one process that differ start it afresh (the process group, and
    under data parallel the device, kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision, cpu = PRECISIONS[train_cfg.get("autocast") or None], torch.device(device).type == "cpu"
    process = PartialState._shared_state and PartialState()
    if process and (process.device.type == "cpu") != cpu and not process.use_distributed:
        AcceleratorState._reset_state(reset_partial_state=True)
    elif AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=cpu, device_placement=False)


def answers_last(model, batcher) -> bool:
    """Whether ``model``'s training batches end every row with its answer (a decoder's: left
    padded, prompt then answer) and its transformers model can compute the logits of the last
    positions alone (``logits_to_keep``)."""
    if getattr(batcher, "kind", None) != "decoder":
        return False
    hf = model.hf_model if hasattr(model, "hf_model") else model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(hf.forward).parameters


def training_loss(runner, batch: dict, answers_at_end: bool = False) -> torch.Tensor:
    """The batch's loss. Where every row ends with its answer (``answers_last``), the mean
    cross-entropy of the answer tokens from the logits of only the positions that predict them:
    the model's own loss would run the LM head and a vocabulary-wide softmax over every prompt
    position too (most of a classification prompt), for no gradient. (The model does not see
    ``labels`` then: a fused batch carries its ``target_prompt_lengths``, as the batcher's do, or
    gets them from its labels here.)"""
    labels = batch.get("labels")
    if not answers_at_end or labels is None:
        return runner(**batch).loss
    if batch.get("source_input_ids") is not None and batch.get("target_prompt_lengths") is None:
        batch = {**batch, "target_prompt_lengths": prompt_lengths(batch["attention_mask"], labels)}
    length = labels.shape[1]
    first = int((labels != -100).any(0).int().argmax())  # the first column holding an answer token
    keep = min(length - first + 1, length)  # position p predicts token p + 1
    logits = runner(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, length - keep + 1:].flatten(),
                                             ignore_index=-100)


def _accumulate(accelerator, runner, batcher, group: list[list[int]], targets, english, device,
                answers_at_end: bool = False) -> list[float]:
    """Forward and backward of the micro-batches of one optimizer step (this rank's share of each);
    gradients are synchronised across ranks on the last micro-batch only. Their losses."""
    world, rank = accelerator.num_processes, accelerator.process_index
    losses = []
    for number, indices in enumerate(group):
        indices = indices[rank::world]
        batch = batcher([targets[i] for i in indices], [english[i] for i in indices] if english is not None else None)
        last = number == len(group) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(runner):
            loss = training_loss(runner, to_device(batch, device), answers_at_end) / len(group)  # autocast by accelerate
            accelerator.backward(loss)
        losses.append(accelerator.reduce(loss.detach(), "mean").item() * len(group))
    return losses


def train_model(model, batcher, targets: list[dict], english: list[dict] | None, train_cfg, seed: int,
                device, desc: str, checkpoint: Checkpoint | None = None, validation: Validation | None = None,
                log: Callable[[dict, int], None] | None = None) -> dict:
    """Train the trainable parameters of ``model`` on ``targets`` (paired with ``english`` for
    FLARE). Returns the mean loss of the first and last epoch, every optimizer step's loss and the
    wall time, and with a
    ``validation`` the validation curve and the selected step, whose adapter the model holds at
    the end.

    With a ``checkpoint``, the state is saved every ``checkpoint.every`` optimizer steps and a
    restarted job (killed, pre-empted) resumes from it and ends as an uninterrupted one would.
    ``log(values, step)`` (a W&B run's ``log``) gets every step's loss, learning rate and gradient
    norm, and each validation score.
    """
    checkpoint = checkpoint or Checkpoint(None, 0)
    params, optimizer, scheduler, total = _optimization(model, train_cfg, len(targets))
    accelerator = accelerator_for(train_cfg, device)
    # The model's forward runs under the run's autocast and, under data parallel, in a DDP wrapper
    # (each rank runs its share of every batch, the source pass included); the optimizer steps
    # through accelerate's gradient scaler under float16. The schedule stays ours: one step per
    # optimizer step, whatever the number of processes. Only the main process writes checkpoints.
    runner, optimizer = accelerator.prepare_model(model, device_placement=False), \
        accelerator.prepare_optimizer(optimizer, device_placement=False)
    if not accelerator.is_main_process:
        checkpoint = Checkpoint(None, 0)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    position, best = checkpoint.load(model, optimizer, scheduler)
    position = position or {"step": 0, "epoch": 0, "group": 0, "epoch_losses": [], "epoch_means": []}
    selection = _Selection(validation, total, position.get("selection"), best,
                           official=train_cfg.get("schedule", "per_epoch") == "official")
    if position["step"]:
        print(f"Resuming {desc} from its checkpoint at step {position['step']}/{total}.", flush=True)
    rng = random.Random(seed)
    order = list(range(len(targets)))
    lengths = [example_length(t) for t in targets] if train_cfg.get("group_by_length") else None
    for _ in range(position["epoch"]):  # replay the shuffles of the finished epochs
        epoch_batches(order, lengths, train_cfg.batch_size, rng)
    step, epoch_means, step_losses = position["step"], position["epoch_means"], position.get("step_losses", [])
    answers_at_end = answers_last(model, batcher)
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True) as progress:
        while step < total:
            micro = epoch_batches(order, lengths, train_cfg.batch_size, rng)
            epoch_losses = position["epoch_losses"] if position["group"] else []
            for group_start in range(position["group"], len(micro), train_cfg.grad_accum):
                group = micro[group_start:group_start + train_cfg.grad_accum]
                losses = _accumulate(accelerator, runner, batcher, group, targets, english, device, answers_at_end)
                epoch_losses.extend(losses)
                step_losses.append(sum(losses) / len(losses))
                norm = accelerator.clip_grad_norm_(params, 1.0)
                rate = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
                score = selection.after_step(model, step, total)
                if log is not None:
                    log({"train/loss": epoch_losses[-1], "train/lr": rate, "train/grad_norm": float(norm),
                         **({"validation/score": score} if score is not None else {})}, step)
                if step >= total:
                    break
                if checkpoint.enabled and step % checkpoint.every == 0:
                    checkpoint.save(model, optimizer, scheduler, {
                        "step": step, "epoch": position["epoch"], "group": group_start + train_cfg.grad_accum,
                        "epoch_losses": epoch_losses, "epoch_means": epoch_means, "step_losses": step_losses,
                        "selection": selection.state()}, selection.best)
            epoch_means.append(sum(epoch_losses) / len(epoch_losses))
            position = {"step": step, "epoch": position["epoch"] + 1, "group": 0, "epoch_losses": [],
                        "epoch_means": epoch_means, "step_losses": step_losses, "selection": selection.state()}
    accelerator.unwrap_model(runner, keep_fp32_wrapper=False)  # the model's own forward back
    model.eval()
    selected = selection.finish(model, step)
    checkpoint.remove()
    return {"steps": step, "first_epoch_loss": epoch_means[0], "last_epoch_loss": epoch_means[-1],
            "step_losses": step_losses, "train_seconds": time.perf_counter() - start, **selected}
