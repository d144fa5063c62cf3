"""Turning examples into model batches: classification heads for encoders, prompts and answer
tokens for decoders, and the English source with its alignment map for FLARE."""

from __future__ import annotations

import torch

from ..flare.alignment import build_source_index


class Batcher:
    """Builds the tensors of one batch.

    ``kind`` is ``encoder`` (sequence classification: labels are class indices) or ``decoder``
    (prompt + verbaliser; loss on the answer tokens only; left padding). With ``english`` the
    batch also carries ``source_input_ids``/``source_attention_mask`` (the English version of
    each example: for decoders its prompt without answer) and, for decoders in training, the
    ``source_index`` map in which answer tokens fuse the last source position (spec D5).
    """

    def __init__(self, tokenizer, task_cfg, kind: str, max_length: int, alignment: str = "position",
                 mask_source_padding: bool = True):
        if kind not in ("encoder", "decoder"):
            raise ValueError(f"Unknown model kind {kind!r} (encoder or decoder).")
        self.tokenizer = tokenizer
        self.fields = list(task_cfg.fields)
        self.qa = task_cfg.type == "qa"
        self.labels = None if self.qa else list(task_cfg.labels)
        self.prompt = task_cfg.prompt
        self.kind = kind
        self.max_length = max_length
        self.alignment = alignment
        self.mask_source_padding = mask_source_padding

    # -- encoders --------------------------------------------------------------------------
    def _encode_pairs(self, examples):
        columns = [[ex[f] for ex in examples] for f in self.fields]
        return self.tokenizer(*columns, truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")

    # -- decoders --------------------------------------------------------------------------
    def _prompt_ids(self, example, budget: int) -> list[int]:
        """BOS + the formatted prompt; a prompt over ``budget`` tokens loses the end of its first
        field (the text, or the QA context), never the question or the "Label: " cue."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        values = {f: example[f] for f in self.fields}
        ids = tok(self.prompt.format(**values), add_special_tokens=False)["input_ids"]
        if len(bos) + len(ids) > budget:
            first = self.fields[0]
            overhead = len(tok(self.prompt.format(**{**values, first: ""}), add_special_tokens=False)["input_ids"])
            keep = max(budget - len(bos) - overhead - 2, 1)
            field_ids = tok(values[first], add_special_tokens=False)["input_ids"][:keep]
            values[first] = tok.decode(field_ids)
            ids = tok(self.prompt.format(**values), add_special_tokens=False)["input_ids"]
            ids = ids[len(ids) - (budget - len(bos)):] if len(bos) + len(ids) > budget else ids
        return bos + ids

    def answer_text(self, example) -> str:
        return example["answers"][0]["text"] if self.qa else example["label"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def _left_pad(self, rows: list[list[int]], fill: int):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), fill, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        return ids, mask

    # -- batches ---------------------------------------------------------------------------
    def __call__(self, examples: list[dict], english: list[dict] | None = None, train: bool = True) -> dict:
        if english is not None and len(english) != len(examples):
            raise ValueError("Every target example needs its English version.")
        if self.kind == "encoder":
            if self.qa:
                raise ValueError("Encoders answer QA with a span head: use flare_exp.data.qa.SpanBatcher.")
            batch = dict(self._encode_pairs(examples))
            batch["labels"] = torch.tensor([self.labels.index(ex["label"]) for ex in examples])
            if english is not None:
                batch.update({f"source_{k}": v for k, v in self._encode_pairs(english).items()})
            return batch

        pad = self.tokenizer.pad_token_id
        if not train:
            ids, mask = self._left_pad([self._prompt_ids(ex, self.max_length) for ex in examples], pad)
            batch = {"input_ids": ids, "attention_mask": mask}
        else:
            answers = [self.answer_ids(self.answer_text(ex)) for ex in examples]
            prompts = [self._prompt_ids(ex, self.max_length - len(a)) for ex, a in zip(examples, answers)]
            ids, mask = self._left_pad([p + a for p, a in zip(prompts, answers)], pad)
            labels = torch.full_like(ids, -100)
            for i, answer in enumerate(answers):
                labels[i, ids.shape[1] - len(answer):] = torch.tensor(answer)
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if english is not None:
            source_ids, source_mask = self._left_pad([self._prompt_ids(ex, self.max_length) for ex in english], pad)
            batch["source_input_ids"], batch["source_attention_mask"] = source_ids, source_mask
            if train:
                batch["source_index"] = build_source_index(
                    mask, source_mask, strategy=self.alignment, anchor="end",
                    target_prompt_lengths=torch.tensor([len(p) for p in prompts]),
                    mask_source_padding=self.mask_source_padding,
                )
        return batch
