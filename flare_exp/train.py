"""One training recipe for stage 1 and stage 2, and evaluation.

A plain loop (AdamW, linear schedule with warm-up, gradient accumulation), so that the two-pass
FLARE step is visible in one place: the model is a PEFT model (stage 1, LoRA stage 2) or a
``FlareModel``, and a batch carries the English source only when the model fuses it.
"""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .metrics import classification_metrics, parse_label, qa_metrics


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def train_model(model, batcher, targets: list[dict], english: list[dict] | None, train_cfg, seed: int,
                device, desc: str) -> dict:
    """Train the trainable parameters of ``model`` on ``targets`` (paired with ``english`` for
    FLARE). Returns the mean loss of the first and last epoch and the wall time."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay))
    per_epoch = math.ceil(len(targets) / (train_cfg.batch_size * train_cfg.grad_accum))
    total = int(train_cfg.max_steps) if train_cfg.max_steps else per_epoch * int(train_cfg.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * train_cfg.warmup_ratio), total)
    if train_cfg.gradient_checkpointing:
        hf = getattr(model, "hf_model", None) or model.get_base_model()
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rng = random.Random(seed)
    order = list(range(len(targets)))
    model.train()
    losses: list[float] = []
    epoch_means: list[float] = []
    step = 0
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) as progress:
        while step < total:
            rng.shuffle(order)
            epoch_losses = []
            micro = list(_chunks(order, train_cfg.batch_size))
            for group_start in range(0, len(micro), train_cfg.grad_accum):
                group = micro[group_start:group_start + train_cfg.grad_accum]
                for indices in group:
                    batch = batcher([targets[i] for i in indices],
                                    [english[i] for i in indices] if english is not None else None)
                    loss = model(**_to(batch, device)).loss / len(group)
                    loss.backward()
                    epoch_losses.append(loss.item() * len(group))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
                if step >= total:
                    break
            epoch_means.append(sum(epoch_losses) / len(epoch_losses))
            losses.extend(epoch_losses)
    model.eval()
    return {"steps": step, "first_epoch_loss": epoch_means[0], "last_epoch_loss": epoch_means[-1],
            "train_seconds": time.perf_counter() - start}


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def predict(model, batcher, examples: list[dict], english: list[dict] | None, eval_batch_size: int,
            device, max_new_tokens: int, desc: str) -> list[dict]:
    """Predictions ``{"id", "gold", "prediction", "output"}`` for ``examples``: a label (None
    where a generated output names none) or an answer string."""
    model.eval()
    rows = []
    for start in tqdm(range(0, len(examples), eval_batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = examples[start:start + eval_batch_size]
        source = english[start:start + eval_batch_size] if english is not None else None
        batch = batcher(chunk, source, train=False)
        if batcher.kind == "encoder" and batcher.qa:
            spans = {k: batch.pop(k) for k in ("_rows", "_offsets", "_sequence_ids")}
            out = model(**_to(batch, device))
            outputs = batcher.best_spans(chunk, spans["_rows"], spans["_offsets"], spans["_sequence_ids"],
                                         out.start_logits.float().cpu(), out.end_logits.float().cpu())
            predictions = outputs
        elif batcher.kind == "encoder":
            batch.pop("labels")
            logits = model(**_to(batch, device)).logits
            outputs = [batcher.labels[i] for i in logits.argmax(-1).tolist()]
            predictions = outputs
        else:
            batch = _to(batch, device)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=batcher.tokenizer.pad_token_id)
            if batcher.kind == "decoder":  # decoders return prompt + answer, encoder-decoders the answer
                generated = generated[:, batch["input_ids"].shape[1]:]
            outputs = batcher.tokenizer.batch_decode(generated, skip_special_tokens=True)
            if batcher.qa:
                predictions = [_first_line(o) for o in outputs]
            else:
                predictions = [parse_label(o, batcher.labels) for o in outputs]
        for ex, output, prediction in zip(chunk, outputs, predictions):
            gold = [a["text"] for a in ex["answers"]] if batcher.qa else ex["label"]
            rows.append({"id": ex["id"], "gold": gold, "prediction": prediction, "output": output})
    return rows


def score(rows: list[dict], batcher) -> dict:
    if batcher.qa:
        return qa_metrics([r["prediction"] for r in rows], [r["gold"] for r in rows])
    return classification_metrics([r["gold"] for r in rows], [r["prediction"] for r in rows], batcher.labels)
