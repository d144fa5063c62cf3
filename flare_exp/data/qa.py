"""Extractive QA with a span head (encoders): features with document stride, and answer spans
from start/end logits.

A long context is split into overlapping windows (features). Under FLARE every window of an
example fuses the English version of the example, truncated to one window: the alignment map
(from the start) pairs the question and the beginning of the context; later windows fuse
what position-wise alignment finds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_QUESTION_TOKENS = 64
QUESTION_MARGIN = 8  # the special tokens of a pair, and a cut question tokenized again a little longer


@dataclass
class SpanLayout:
    """Where the features of an evaluation batch come from: ``rows[f]`` is the example of
    feature f, ``offsets[f]`` its tokens' character spans, ``sequence_ids[f]`` which tokens are
    question (0) and context (1)."""

    rows: torch.Tensor
    offsets: torch.Tensor
    sequence_ids: list[list[int | None]]


class SpanBatcher:
    """Features of QA examples for a ``...ForQuestionAnswering`` model (right padding)."""

    def __init__(self, tokenizer, max_length: int = 384, stride: int = 128, max_answer_tokens: int = 30,
                 mt_tokenizer=None, mt_lang: str | None = None):
        if not tokenizer.is_fast:
            raise ValueError("The span head needs a fast tokenizer (offset mappings).")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.stride = min(stride, max_length // 2)
        self.max_answer_tokens = max_answer_tokens
        self.kind = "encoder"
        self.qa = True
        self.labels = None
        self.mt_tokenizer, self.mt_lang = mt_tokenizer, mt_lang  # FLARE MT: the MT encoder reads the target

    @property
    def max_question_tokens(self) -> int:
        """A question's token budget (BERT's SQuAD setting of 64, less where a window is short):
        a window keeps more than ``stride`` context tokens beside its question, which the
        tokenizer needs to cut windows at all (it panics otherwise)."""
        return max(1, min(MAX_QUESTION_TOKENS, self.max_length - self.stride - QUESTION_MARGIN))

    def questions(self, examples: list[dict]) -> list[str]:
        """The examples' questions, each cut to ``max_question_tokens`` (a question of hundreds of
        tokens, such as an MT system that repeats itself writes, left no context window)."""
        texts = [ex["question"] for ex in examples]
        budget = self.max_question_tokens
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [text if len(i) <= budget else self.tokenizer.decode(i[:budget]) for text, i in zip(texts, ids)]

    def features(self, examples: list[dict]):
        return self.tokenizer(
            self.questions(examples), [ex["context"] for ex in examples],
            truncation="only_second", max_length=self.max_length, stride=self.stride,
            return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt",
        )

    def _source(self, english: list[dict], rows: torch.Tensor) -> dict:
        encoded = self.tokenizer(self.questions(english), [ex["context"] for ex in english],
                                 truncation="only_second", max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        return {f"source_{k}": v[rows] for k, v in encoded.items()}

    def __call__(self, examples: list[dict], english: list[dict] | None = None, train: bool = True) -> dict:
        return self.encode(examples, english, train)[0]

    def encode(self, examples: list[dict], english: list[dict] | None = None,
               train: bool = True) -> tuple[dict, SpanLayout | None]:
        """The model batch, and for evaluation (``train=False``) the features' ``SpanLayout``."""
        enc = self.features(examples)
        layout = None
        rows = enc["overflow_to_sample_mapping"]
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        if train:
            starts, ends = [], []
            for f, row in enumerate(rows.tolist()):
                answer = examples[row]["answers"][0]
                start_char = answer["answer_start"]
                end_char = start_char + len(answer["text"])
                sequence = enc.sequence_ids(f)
                offsets = enc["offset_mapping"][f].tolist()
                context = [i for i, s in enumerate(sequence) if s == 1]
                first, last = context[0], context[-1]
                if offsets[first][0] > start_char or offsets[last][1] < end_char:
                    starts.append(0)  # the answer is not in this window: point at [CLS]
                    ends.append(0)
                    continue
                start = first
                while start <= last and offsets[start][0] <= start_char:
                    start += 1
                end = last
                while end >= first and offsets[end][1] >= end_char:
                    end -= 1
                starts.append(start - 1)
                ends.append(end + 1)
            batch["start_positions"] = torch.tensor(starts)
            batch["end_positions"] = torch.tensor(ends)
        else:
            layout = SpanLayout(rows, enc["offset_mapping"], [enc.sequence_ids(f) for f in range(len(rows))])
        if self.mt_tokenizer is not None:
            self.mt_tokenizer.src_lang = self.mt_lang
            mt = self.mt_tokenizer([f"{ex['question']}\n{ex['context']}" for ex in examples], truncation=True,
                                   max_length=self.max_length, padding=True, return_tensors="pt")
            batch["mt_input_ids"], batch["mt_attention_mask"] = mt["input_ids"][rows], mt["attention_mask"][rows]
        elif english is not None:
            batch.update(self._source(english, rows))
        return batch, layout

    def best_spans(self, examples, layout: SpanLayout, start_logits, end_logits, top: int = 20):
        """The best-scoring answer text of each example over all its windows."""
        best = [(-float("inf"), "") for _ in examples]
        offsets = layout.offsets
        for f, row in enumerate(layout.rows.tolist()):
            context = [i for i, s in enumerate(layout.sequence_ids[f]) if s == 1]
            if not context:
                continue
            lo, hi = context[0], context[-1]
            starts = torch.topk(start_logits[f, lo:hi + 1], min(top, hi - lo + 1)).indices + lo
            ends = torch.topk(end_logits[f, lo:hi + 1], min(top, hi - lo + 1)).indices + lo
            for s in starts.tolist():
                for e in ends.tolist():
                    if e < s or e - s + 1 > self.max_answer_tokens:
                        continue
                    score = float(start_logits[f, s] + end_logits[f, e])
                    if score > best[row][0]:
                        text = examples[row]["context"][int(offsets[f, s, 0]):int(offsets[f, e, 1])]
                        best[row] = (score, text)
        return [text for _, text in best]

    def answers(self, examples, layout: SpanLayout, start_logits, end_logits) -> tuple[list, list]:
        """(outputs, predictions) of an evaluation batch: the best span's text, both."""
        spans = self.best_spans(examples, layout, start_logits, end_logits)
        return spans, spans


@dataclass
class WindowLayout:
    """Where the answer of each example of an evaluation batch is: its tokens' character spans,
    which tokens are context, and the gold start and end token indices."""

    offsets: list[list[tuple[int, int]]]
    sequence_ids: list[list[int | None]]
    gold: list[tuple[int, int]]


class OneWindowBatcher:
    """Extractive QA as the official code reads it (``protocol.qa_windows: one``; tasks/tydiqa.py,
    QADataset): question and context without special tokens, the context cut (only_second, on
    ``truncation_side``) to ``max_length - 1`` tokens, then EOS (an encoder without one: its SEP),
    right padding to ``max_length``; the answer's start and end token indices found by the
    official loop over the context tokens, (0, 0) where the window lacks it. ``token_index``
    (``protocol.qa_encoder_score``): an answer scores by its indices (argmax over every position,
    padding included), else by its text. A question too long to leave one context token (the
    official code fails on it) is cut to ``max_length - 2`` tokens. FLARE's English source is
    read the same way; FLARE MT's as ``SpanBatcher`` reads it."""

    kind = "encoder"
    qa = True
    labels = None

    def __init__(self, tokenizer, max_length: int = 128, truncation_side: str = "right", token_index: bool = False,
                 mt_tokenizer=None, mt_lang: str | None = None, fuse: bool = False, mt_joiner: str = "\n"):
        if not tokenizer.is_fast:
            raise ValueError("The span head needs a fast tokenizer (offset mappings).")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"Unknown truncation side {truncation_side!r} (right or left).")
        self.tokenizer, self.max_length, self.truncation_side = tokenizer, max_length, truncation_side
        self.token_index = token_index
        self.end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.mt_tokenizer, self.mt_lang = mt_tokenizer, mt_lang
        self.fuse = fuse  # input fusion (tasks/tydiqa.py, QAInputFusionDataset): the English window, then the target's
        self.mt_joiner = mt_joiner  # between question and context in FLARE MT's text (official: nothing)

    def window(self, example: dict, budget: int | None = None,
               eos: bool = True) -> tuple[list[int], list, list, tuple[int, int]]:
        """(token ids, offsets, sequence ids, (start, end) of the answer) of one example, in
        ``budget`` tokens (default ``max_length - 1``), then (``eos``) EOS."""
        tok = self.tokenizer
        budget = self.max_length - 1 if budget is None else budget
        question = example["question"]
        ids = tok(question, add_special_tokens=False)["input_ids"]
        if len(ids) > budget - 1:
            question = tok.decode(ids[: budget - 1])
        side, tok.truncation_side = tok.truncation_side, self.truncation_side
        try:
            enc = tok(question, example["context"], add_special_tokens=False, max_length=budget,
                      truncation="only_second", return_offsets_mapping=True)
        finally:
            tok.truncation_side = side
        offsets, sequence = enc["offset_mapping"], enc.sequence_ids()
        answer = example["answers"][0]
        start_char = answer["answer_start"]
        end_char = start_char + len(answer["text"])
        context = [i for i, s in enumerate(sequence) if s == 1]
        start = end = None
        for i in context:
            if offsets[i][0] <= start_char < offsets[i][1]:
                start = i
            if offsets[i][0] < end_char <= offsets[i][1]:
                end = i
                break
        if start is None or end is None:
            start = end = 0
        return enc["input_ids"] + ([self.end_id] if eos else []), offsets, sequence, (start, end)

    def fused(self, target: dict, english: dict) -> tuple[list[int], list, list, tuple[int, int]]:
        """Input fusion's window as the official code builds it (QAInputFusionDataset): the English
        and the target example each in ``max_length // 2 - 1`` tokens, side by side, then EOS; the
        target's answer indices moved by the English window's length ((0, 0) too: an answer
        outside the target's window points at the target's first token)."""
        half = self.max_length // 2 - 1
        source = self.window(english, half, eos=False)[0]
        ids, offsets, sequence, (start, end) = self.window(target, half, eos=False)
        shift = len(source)
        return (source + ids + [self.end_id], [(0, 0)] * shift + offsets, [None] * shift + sequence,
                (start + shift, end + shift))

    def _padded(self, windows) -> dict:
        ids = torch.full((len(windows), self.max_length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(windows), self.max_length), dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, : len(window[0])] = torch.tensor(window[0])
            mask[row, : len(window[0])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, examples: list[dict], english: list[dict] | None = None, train: bool = True) -> dict:
        return self.encode(examples, english, train)[0]

    def encode(self, examples: list[dict], english: list[dict] | None = None,
               train: bool = True) -> tuple[dict, WindowLayout | None]:
        if self.fuse:
            if english is None:
                raise ValueError("Input fusion needs the English version of every example.")
            windows = [self.fused(ex, en) for ex, en in zip(examples, english, strict=True)]
        else:
            windows = [self.window(ex) for ex in examples]
        batch = self._padded(windows)
        layout = None
        if train:
            batch["start_positions"] = torch.tensor([w[3][0] for w in windows])
            batch["end_positions"] = torch.tensor([w[3][1] for w in windows])
        else:
            layout = WindowLayout([w[1] for w in windows], [w[2] for w in windows], [w[3] for w in windows])
        if self.mt_tokenizer is not None:
            self.mt_tokenizer.src_lang = self.mt_lang
            mt = self.mt_tokenizer([ex["question"] + self.mt_joiner + ex["context"] for ex in examples], truncation=True,
                                   max_length=self.max_length, padding=True, return_tensors="pt")
            batch["mt_input_ids"], batch["mt_attention_mask"] = mt["input_ids"], mt["attention_mask"]
        elif english is not None and not self.fuse:
            source = self._padded([self.window(ex) for ex in english])
            batch.update({f"source_{k}": v for k, v in source.items()})
        return batch, layout

    def answers(self, examples, layout: WindowLayout, start_logits, end_logits) -> tuple[list, list]:
        """(outputs, predictions) of an evaluation batch: each output the argmax start and end token
        indices and the gold ones, each prediction the text between them (empty where they are
        not an ordered span of context tokens)."""
        outputs, texts = [], []
        for row, example in enumerate(examples):
            start, end = int(start_logits[row].argmax()), int(end_logits[row].argmax())
            sequence, offsets = layout.sequence_ids[row], layout.offsets[row]
            inside = all(i < len(sequence) and sequence[i] == 1 for i in (start, end)) and start <= end
            texts.append(example["context"][offsets[start][0]:offsets[end][1]] if inside else "")
            outputs.append({"start": start, "end": end, "gold": list(layout.gold[row])})
        return outputs, texts
