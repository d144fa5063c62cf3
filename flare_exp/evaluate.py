"""Evaluation: predictions of a model on examples (a label, an answer span or a generated
answer) and their scores."""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .metrics import (classification_metrics, last_word_label, official_label_metrics, official_qa_metrics,
                      official_same, parse_label, qa_metrics, token_index_metrics)
from .data.batching import example_length, length_grouped
from .data.batching import to_device as _to


def autocast(device, dtype: str | None):
    """Mixed precision (``bfloat16``, ``float16``) for evaluation's forward passes; None: off
    (training's autocast is accelerate's)."""
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def predict(model, batcher, examples: list[dict], english: list[dict] | None, eval_batch_size: int,
            device, max_new_tokens: int, desc: str, precision: str | None = None,
            group_by_length: bool = True, generation: str = "greedy") -> list[dict]:
    """Predictions ``{"id", "gold", "prediction", "output"}`` for ``examples`` (in their order):
    a label (None where a generated output names none) or an answer string. ``precision``: the
    autocast dtype; ``group_by_length``: batches of examples of similar length (less padding);
    ``generation``: ``greedy``, or ``model_config`` (the model's generation config decides:
    ``protocol.generation``)."""
    model.eval()
    order = list(range(len(examples)))
    batches = (length_grouped(order, [example_length(ex) for ex in examples], eval_batch_size, window=len(order))
               if group_by_length else [order[i:i + eval_batch_size] for i in range(0, len(order), eval_batch_size)])
    rows: list[dict | None] = [None] * len(examples)
    for indices in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True):
        chunk = [examples[i] for i in indices]
        source = [english[i] for i in indices] if english is not None else None
        with autocast(device, precision):
            outputs, predictions = _predict_batch(model, batcher, chunk, source, device, max_new_tokens, generation)
        for i, ex, output, prediction in zip(indices, chunk, outputs, predictions):
            gold = [a["text"] for a in ex["answers"]] if batcher.qa else ex["label"]
            rows[i] = {"id": ex["id"], "gold": gold, "prediction": prediction, "output": output}
    return rows


def decoding(model, generation: str) -> dict:
    """How ``predict`` decodes a generating model under ``generation`` (for results.json): greedy,
    or what the model's generation config sets (``model_config``), sampling included."""
    if generation == "greedy":
        return {"generation": generation, "do_sample": False, "num_beams": 1}
    config = getattr(getattr(model, "hf_model", model), "generation_config", None)
    settings = {"do_sample": bool(getattr(config, "do_sample", False)), "num_beams": getattr(config, "num_beams", 1) or 1}
    if settings["do_sample"]:
        settings.update({k: getattr(config, k, None) for k in ("temperature", "top_p", "top_k")})
    return {"generation": generation, **settings}


def _predict_batch(model, batcher, chunk, source, device, max_new_tokens, generation) -> tuple[list, list]:
    """(raw outputs, predictions) of one batch: spans, classes, or parsed generations."""
    if batcher.kind == "encoder" and batcher.qa:
        batch, layout = batcher.encode(chunk, source, train=False)
        out = model(**_to(batch, device))
        return batcher.answers(chunk, layout, out.start_logits.float().cpu(), out.end_logits.float().cpu())
    batch = _to(batcher(chunk, source, train=False), device)
    if batcher.kind == "encoder":
        batch.pop("labels")
        classes = [batcher.labels[i] for i in model(**batch).logits.argmax(-1).tolist()]
        return classes, classes
    if generation not in ("greedy", "model_config"):
        raise ValueError(f"Unknown generation {generation!r} (greedy or model_config).")
    sampling = {"do_sample": False} if generation == "greedy" else {}  # else the model's generation config
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=batcher.tokenizer.pad_token_id,
                               **sampling)
    if batcher.kind == "decoder":  # decoders return prompt + answer, encoder-decoders the answer
        generated = generated[:, batch["input_ids"].shape[1]:]
    outputs = batcher.tokenizer.batch_decode(generated, skip_special_tokens=True)
    if batcher.scoring:
        return _official(batcher, chunk, batch, generated, outputs)
    if batcher.qa:
        return outputs, [_first_line(o) for o in outputs]
    return outputs, [parse_label(o, batcher.labels) for o in outputs]


def _official(batcher, chunk, batch, generated, outputs) -> tuple[list, list]:
    """(outputs, predictions) as the official code reads a generation (``protocol.decoder_scoring:
    official``): the prompt and the output decoded together (a decoder's prompt; an encoder-decoder
    has none in its output), against the prompt and a label or the gold answer with EOS.
    ``last_word`` (NusaX): the label is the last word, the output with both texts (``score`` reads
    the gold from the second); ``exact_match`` (XNLI): the label whose text matches exactly (case
    and punctuation aside), else None; QA: the output with both texts, for ``score``."""
    tok = batcher.tokenizer
    if batcher.kind == "decoder":
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
    else:
        prompts = [[] for _ in chunk]

    def text(prompt, ids) -> str:
        return tok.decode(prompt + list(ids), skip_special_tokens=True)

    full = [text(p, g.tolist()) for p, g in zip(prompts, generated.cpu())]
    if batcher.qa or batcher.scoring == "last_word":
        rows = [{"text": o, "full": f, "gold_full": text(p, batcher.answer_ids(batcher.answer_text(ex)))}
                for o, f, p, ex in zip(outputs, full, prompts, chunk)]
        if batcher.qa:
            return rows, [o.strip() for o in outputs]
        return rows, [last_word_label(f, batcher.labels) for f in full]
    predictions = []
    for f, p in zip(full, prompts):
        named = [l for l in batcher.labels if official_same(f, text(p, batcher.answer_ids(l)))]
        predictions.append(named[0] if named else None)
    return outputs, predictions


def score(rows: list[dict], batcher) -> dict:
    if batcher.qa and getattr(batcher, "token_index", False):
        return token_index_metrics([r["output"] for r in rows])
    scoring = getattr(batcher, "scoring", None)
    if batcher.qa and scoring:
        return official_qa_metrics([r["output"] for r in rows])
    if batcher.qa:
        return qa_metrics([r["prediction"] for r in rows], [r["gold"] for r in rows])
    if scoring == "last_word":  # the official NusaX scoring: the gold read as the output is read
        return official_label_metrics(rows, batcher.labels)
    return classification_metrics([r["gold"] for r in rows], [r["prediction"] for r in rows], batcher.labels)
