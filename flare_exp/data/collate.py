"""Turning examples into model batches: classification heads for encoders, prompts and answer
tokens for decoders and encoder-decoders, and the source each method fuses (the English version
with its alignment map, or the MT encoder's reading of the target text)."""

from __future__ import annotations

import torch


class Batcher:
    """Builds the tensors of one batch.

    ``kind``: ``encoder`` (sequence classification: labels are class indices), ``decoder``
    (prompt + answer tokens, loss on the answer only, left padding) or ``encoder_decoder``
    (prompt in the encoder, answer as decoder labels, right padding).

    The source of a FLARE batch: with ``english``, the English version of each example
    (``source_input_ids``/``source_attention_mask``; for generative models its prompt without
    answer). With an ``mt_tokenizer`` (FLARE MT), the MT encoder's tokenization of the target
    text itself (``mt_input_ids``/``mt_attention_mask``, source language tag ``mt_lang``).
    Decoder training batches with a source also carry ``target_prompt_lengths`` (the prompt
    tokens of each row; the rest is answer): the model aligns source and target itself.
    """

    def __init__(self, tokenizer, task_cfg, kind: str, max_length: int, mt_tokenizer=None,
                 mt_lang: str | None = None, truncation_side: str = "right", official_cut: bool = False,
                 segment: str | None = None, mt_prompt: bool = False, scoring: str | None = None,
                 prompt_eos: bool = False, prompt: str | None = None):
        if kind not in ("encoder", "decoder", "encoder_decoder"):
            raise ValueError(f"Unknown model kind {kind!r} (encoder, decoder or encoder_decoder).")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"Unknown truncation side {truncation_side!r} (right or left).")
        self.truncation_side = truncation_side
        self.official_cut = official_cut and kind == "decoder"
        self.segment = segment  # an encoder's fields in one segment (the official XNLI format), else a pair
        self.mt_prompt = mt_prompt  # FLARE MT reads a generative model's prompt (the official code's)
        # how generated text is scored: None (the first word naming a label, the first line of an
        # answer) or the official rule (``last_word``, ``exact_match``: flare_exp.evaluate)
        self.scoring = scoring if kind != "encoder" else None
        self.prompt_eos = prompt_eos and kind == "decoder"  # a decoder's prompt ends in EOS (Gemma 2's, official)
        self.tokenizer = tokenizer
        self.fields = list(task_cfg.fields)
        self.qa = task_cfg.type == "qa"
        self.labels = None if self.qa else list(task_cfg.labels)
        self.prompt = prompt or task_cfg.prompt  # another: it may name an example's further keys (en_context)
        self.kind = kind
        self.max_length = max_length
        self.mt_tokenizer = mt_tokenizer
        self.mt_lang = mt_lang

    # -- pieces ----------------------------------------------------------------------------
    def _encode_pairs(self, examples):
        columns = ([[self.segment.format(**{f: ex[f] for f in self.fields}) for ex in examples]] if self.segment
                   else [[ex[f] for ex in examples] for f in self.fields])
        tok = self.tokenizer
        side, tok.truncation_side = tok.truncation_side, self.truncation_side
        try:
            return tok(*columns, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        finally:
            tok.truncation_side = side

    def _prompt_ids(self, example, budget: int) -> list[int]:
        """BOS + the formatted prompt (+ EOS for an encoder-decoder, or ``prompt_eos``); a prompt over
        ``budget`` tokens loses the end of its first field (the text, or the QA context), never the question or
        the "Label: " cue; under left truncation (``truncation_side``) its beginning instead."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and self.kind == "decoder" else []
        eos = [tok.eos_token_id] if self.kind == "encoder_decoder" or self.prompt_eos else []
        budget -= len(bos) + len(eos)
        values = dict(example)
        ids = tok(self.prompt.format(**values), add_special_tokens=False)["input_ids"]
        if len(ids) > budget and self.truncation_side == "left":
            ids = ids[len(ids) - max(budget, 0):]
        elif len(ids) > budget:
            first = self.fields[0]
            overhead = len(tok(self.prompt.format(**{**values, first: ""}), add_special_tokens=False)["input_ids"])
            keep = max(budget - overhead - 2, 1)
            values[first] = tok.decode(tok(values[first], add_special_tokens=False)["input_ids"][:keep])
            ids = tok(self.prompt.format(**values), add_special_tokens=False)["input_ids"]
            ids = ids[max(len(ids) - budget, 0):]
        return bos + ids + eos

    def _official_prompt_ids(self, example, answer: list[int]) -> list[int]:
        """A decoder's prompt cut as the official code cuts it (tasks/*.py, the CLM datasets, train
        and test alike): BOS, the prompt and (``prompt_eos``) EOS in ``max_length`` tokens (the
        prompt's end kept under left truncation, its beginning under right), then, where it and
        ``answer`` (the gold answer's tokens and EOS) exceed ``max_length``, the tail cut by the
        answer's length (the prompt's EOS first)."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if self.prompt_eos else []
        ids = tok(self.prompt.format(**example), add_special_tokens=False)["input_ids"]
        room = max(self.max_length - len(bos) - len(eos), 0)
        ids = bos + (ids[max(len(ids) - room, 0):] if self.truncation_side == "left" else ids[:room]) + eos
        return ids[: self.max_length - len(answer)] if len(ids) + len(answer) > self.max_length else ids

    def answer_text(self, example) -> str:
        return example["answers"][0]["text"] if self.qa else example["label"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    @staticmethod
    def _pad(rows: list[list[int]], fill: int, left: bool):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), fill, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            if row:
                ids[i, span] = torch.tensor(row)
                mask[i, span] = 1
        return ids, mask

    def _prompts(self, examples, answers_of=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts of ``examples``, padded; under ``official_cut`` each cut by the gold answer
        of its row of ``answers_of`` (the target examples; default ``examples``)."""
        if self.official_cut:
            answers = [self.answer_ids(self.answer_text(ex)) for ex in (answers_of or examples)]
            rows = [self._official_prompt_ids(ex, a) for ex, a in zip(examples, answers)]
        else:
            rows = [self._prompt_ids(ex, self.max_length) for ex in examples]
        return self._pad(rows, self.tokenizer.pad_token_id, left=self.kind == "decoder")

    def _mt_source(self, examples) -> dict:
        tok = self.mt_tokenizer
        tok.src_lang = self.mt_lang
        if self.mt_prompt and self.kind != "encoder":
            texts = [self.prompt.format(**ex) for ex in examples]
        elif self.segment:
            texts = [self.segment.format(**{f: ex[f] for f in self.fields}) for ex in examples]
        else:
            texts = ["\n".join(ex[f] for f in self.fields) for ex in examples]
        encoded = tok(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {"mt_input_ids": encoded["input_ids"], "mt_attention_mask": encoded["attention_mask"]}

    # -- batches ---------------------------------------------------------------------------
    def _target(self, examples, train: bool) -> tuple[dict, list[int] | None]:
        if self.kind == "encoder":
            if self.qa:
                raise ValueError("Encoders answer QA with a span head: use flare_exp.data.qa.SpanBatcher.")
            batch = dict(self._encode_pairs(examples))
            batch["labels"] = torch.tensor([self.labels.index(ex["label"]) for ex in examples])
            return batch, None
        if not train:
            ids, mask = self._prompts(examples)
            return {"input_ids": ids, "attention_mask": mask}, None
        answers = [self.answer_ids(self.answer_text(ex)) for ex in examples]
        pad = self.tokenizer.pad_token_id
        if self.kind == "encoder_decoder":
            ids, mask = self._prompts(examples)
            labels, label_mask = self._pad(answers, pad, left=False)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100)}, None
        prompts = [self._official_prompt_ids(ex, a) if self.official_cut else self._prompt_ids(ex, self.max_length - len(a))
                   for ex, a in zip(examples, answers)]
        ids, mask = self._pad([p + a for p, a in zip(prompts, answers)], pad, left=True)
        labels = torch.full_like(ids, -100)
        for i, answer in enumerate(answers):
            labels[i, ids.shape[1] - len(answer):] = torch.tensor(answer)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}, [len(p) for p in prompts]

    def __call__(self, examples: list[dict], english: list[dict] | None = None, train: bool = True) -> dict:
        if english is not None and len(english) != len(examples):
            raise ValueError("Every target example needs its English version.")
        batch, prompt_lengths = self._target(examples, train)
        if self.mt_tokenizer is not None:
            source = self._mt_source(examples)
        elif english is not None:
            if self.kind == "encoder":
                source = {f"source_{k}": v for k, v in self._encode_pairs(english).items()}
            else:
                ids, mask = self._prompts(english, answers_of=examples)
                source = {"source_input_ids": ids, "source_attention_mask": mask}
        else:
            return batch
        batch.update(source)
        if prompt_lengths is not None:
            batch["target_prompt_lengths"] = torch.tensor(prompt_lengths)
        return batch
