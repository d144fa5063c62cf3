"""The translation stage: NLLB-200 through transformers, an on-disk resumable cache, and the
projection of QA answers through translation (spec sections 5 and 8).

* translate-train: English train/validation -> target language;
* translate-test: target test -> English.

Every (task, split, direction, language, MT model, generation settings) has one cache file, a
JSON line per translated example appended as batches finish, so an interrupted stage resumes
where it stopped and every method and seed reads the same translations. One job at a time
translates into a cache file (a lock beside it); the others wait and then read its translations,
so concurrent jobs neither duplicate the work nor interleave records.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .locking import file_lock
from .record import read_cache

log = logging.getLogger(__name__)

MARKERS = (('"', '"'), ("«", "»"))
QUOTE = '"'  # the official code's one marker


def nllb_code(lang_cfg) -> str:
    """The NLLB-200 code of a language, or its configured fallback (logged), or an error."""
    if lang_cfg.nllb:
        return lang_cfg.nllb
    if lang_cfg.get("nllb_fallback"):
        log.warning("%s has no NLLB-200 code: translating with %s instead (explicit fallback).",
                    lang_cfg.code, lang_cfg.nllb_fallback)
        return lang_cfg.nllb_fallback
    raise ValueError(f"Language {lang_cfg.code} has no NLLB-200 code and no fallback: use mt=gold.")


class NLLBTranslator:
    """NLLB-200 (or any NLLB-shaped seq2seq model); ``beams=None`` decodes with the model's own
    generation settings. The texts of one call are sorted by their token count and cut into
    batches of at most ``batch_size * max_length`` source tokens (padding included): many short
    sentences go together, long ones a few at a time, at one bound of memory."""

    def __init__(self, model: str, beams: int | None = None, max_length: int = 256, batch_size: int = 16,
                 device: str | torch.device = "cpu", dtype: str = "auto"):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.beams, self.max_length, self.batch_size = beams, max_length, batch_size

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices of texts of ``lengths`` tokens, longest first, in batches whose padded size
        stays within the token budget."""
        budget = self.batch_size * self.max_length
        batches, current = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            longest = lengths[current[0]] if current else min(lengths[i], self.max_length)
            if current and (len(current) + 1) * longest > budget:
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    @torch.no_grad()
    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        for code in (src, tgt):  # an unknown code would be read as <unk>: a silent wrong language
            if self.tokenizer.convert_tokens_to_ids(code) in (None, self.tokenizer.unk_token_id):
                raise ValueError(f"The MT model's tokenizer has no language code {code}: use an NLLB-200 model.")
        self.tokenizer.src_lang = src
        target_id = self.tokenizer.convert_tokens_to_ids(tgt)
        lengths = [min(len(ids), self.max_length) for ids in self.tokenizer(texts, truncation=True,
                                                                            max_length=self.max_length)["input_ids"]]
        out: list[str] = [""] * len(texts)
        for chunk in self.batches(lengths):
            batch = self.tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length).to(self.device)
            decoding = {"num_beams": self.beams} if self.beams else {}  # None: the model's own settings
            generated = self.model.generate(**batch, forced_bos_token_id=target_id, max_length=self.max_length,
                                            **decoding)
            for i, text in zip(chunk, self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text
        return out


class FakeTranslator:
    """A deterministic stand-in (tests, offline smoke runs): prefixes every word with the target
    code, so that translations are recognisable and markers survive."""

    def __init__(self, lose_markers_in: tuple[str, ...] = (), delay_s: float = 0.0):
        self.lose_markers_in = lose_markers_in  # texts containing one of these lose their markers
        self.delay_s = delay_s  # seconds per call, as a slow MT system (concurrency tests)
        self.calls = 0

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        self.calls += 1
        time.sleep(self.delay_s)
        prefix = tgt.split("_")[0]
        out = []
        for text in texts:
            lose = any(part in text for part in self.lose_markers_in)
            text = " ".join(self._word(w, prefix) for w in text.split(" "))
            if lose:
                text = text.replace('"', "").replace("«", "").replace("»", "")
            out.append(text)
        return out

    @staticmethod
    def _word(word: str, prefix: str) -> str:
        core = word.strip('"«»')
        if not core:
            return word
        start = word.index(core)
        return f"{word[:start]}{prefix}:{core}{word[start + len(core):]}"


def build_tiny_nllb(folder: Path, vocab: int = 60, seed: int = 0) -> Path:
    """A tiny random NLLB-shaped (M2M-100) model with a word-level tokenizer that knows the codes
    eng_Latn and swh_Latn: the translation code path offline (its output is noise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "eng_Latn", "swh_Latn"] + [f"w{i}" for i in range(vocab)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = M2M100Config(vocab_size=len(words), d_model=16, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                              decoder_ffn_dim=32, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, decoder_start_token_id=2)
        M2M100ForConditionalGeneration(config).save_pretrained(folder)
    return Path(folder)


# -- the cache (its names and reader: flare_exp.record) ---------------------------------------
def _drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a kill, so that appended rows start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


SYNC_EVERY = 1024  # examples translated between two writes (and fsyncs) of the cache


def translate_examples(examples: list[dict], fields: list[str], src: str, tgt: str, translator, path: Path,
                       part: int = SYNC_EVERY, desc: str = "translate") -> list[dict]:
    """``{id: {field: translation}}`` for ``examples``, from the cache where it has them.

    The missing examples are sorted by length over the whole split and handed to the translator
    ``part`` at a time (it batches them by tokens); each part is appended to ``path`` and synced
    once, so a killed stage loses at most the part in flight and a split costs
    ``ceil(missing / part)`` fsyncs. The cache's writer holds its lock: a job that finds
    translations missing waits for it, then reads again and translates only what is still
    missing.
    """
    done = read_cache(path)
    if any(ex["id"] not in done for ex in examples):
        with file_lock(path.with_name(path.name + ".lock")):
            done = read_cache(path)  # what a writer before us added
            _translate_missing(examples, fields, src, tgt, translator, path, part, desc, done)
    return [done[ex["id"]] for ex in examples]


def _translate_missing(examples, fields, src, tgt, translator, path: Path, part: int, desc: str,
                       done: dict) -> None:
    todo = sorted((ex for ex in examples if ex["id"] not in done),
                  key=lambda ex: -sum(len(ex[f]) for f in fields))  # similar lengths side by side
    if todo:
        _drop_partial_line(path)
        started = time.perf_counter()
        with path.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc=desc, unit="ex") as bar:
            for start in range(0, len(todo), part):
                chunk = todo[start:start + part]
                translated = {f: translator.translate([ex[f] for ex in chunk], src, tgt) for f in fields}
                for i, ex in enumerate(chunk):
                    row = {"id": ex["id"], "fields": {f: translated[f][i] for f in fields}}
                    done[ex["id"]] = row["fields"]
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(chunk))
        log.info("translated %d examples in %.1f s (%s)", len(todo), time.perf_counter() - started, path)


# -- QA answers through translation --------------------------------------------------------
def mark_answer(example: dict) -> tuple[str, tuple[str, str]]:
    """The context with its first answer wrapped in quote marks (guillemets where the context
    already holds quote marks)."""
    answer = example["answers"][0]
    context, start = example["context"], answer["answer_start"]
    left, right = MARKERS[1] if '"' in context else MARKERS[0]
    end = start + len(answer["text"])
    return context[:start] + left + answer["text"] + right + context[end:], (left, right)


def locate_answer(translated: str, markers: tuple[str, str]) -> tuple[dict | None, str]:
    """``({"context", "answer", "answer_start"}, "kept")`` or ``(None, "lost" | "duplicated")``."""
    left, right = markers
    if left == right:
        count = translated.count(left)
        if count < 2:
            return None, "lost"
        if count > 2:
            return None, "duplicated"
        first = translated.index(left)
        second = translated.index(left, first + 1)
    else:
        if translated.count(left) == 0 or translated.count(right) == 0:
            return None, "lost"
        if translated.count(left) > 1 or translated.count(right) > 1:
            return None, "duplicated"
        first, second = translated.index(left), translated.index(right)
        if second < first:
            return None, "lost"
    answer = translated[first + 1:second].strip()
    if not answer:
        return None, "lost"
    before = translated[:first]
    gap = translated[first + 1:second]
    context = before + gap + translated[second + 1:]
    start = len(before) + (len(gap) - len(gap.lstrip()))
    return {"context": context, "answer": answer, "answer_start": start}, "kept"


def quote_mark(example: dict) -> str:
    """The context marked as the official code marks it (run_translate.py, process_qa): every quote
    mark removed, the answer's start moved back by as many marks as were removed anywhere in the
    context (before the answer or not), and the span of the answer's length there wrapped in
    quote marks."""
    answer = example["answers"][0]
    context = example["context"]
    stripped = context.replace(QUOTE, "")
    start = answer["answer_start"] - (len(context) - len(stripped))
    end = start + len(answer["text"])
    return stripped[:start] + QUOTE + stripped[start:end] + QUOTE + stripped[end:]


def quote_locate(translated: str) -> dict:
    """A translation of a ``quote_mark``ed context read as the official code reads it
    (run_translate.py, postprocess_qa; tasks/tydiqa.py strips the marks): ``{"context", "answer",
    "answer_start"}``, the context without quote marks, the answer between the first and the last
    mark (one character short for each mark between them; empty where there is one mark), its
    start -1 where there is no mark."""
    start, end = translated.find(QUOTE), translated.rfind(QUOTE)
    context = translated.replace(QUOTE, "")
    return {"context": context, "answer": context[start:end - 1], "answer_start": start}


def project_qa(examples: list[dict], translator, src: str, tgt: str, path: Path, part: int = SYNC_EVERY,
               desc: str = "translate-train") -> tuple[list[dict], dict]:
    """Translate QA examples with their answers (marker method); drop those whose markers are
    lost or duplicated. Returns the kept examples and the counts."""
    marked, markers = [], {}
    for ex in examples:
        context, pair = mark_answer(ex)
        marked.append({"id": ex["id"], "context": context, "question": ex["question"]})
        markers[ex["id"]] = pair
    translated = translate_examples(marked, ["context", "question"], src, tgt, translator, path, part, desc)
    kept, counts = [], {"kept": 0, "lost": 0, "duplicated": 0}
    for ex, fields in zip(examples, translated):
        located, status = locate_answer(fields["context"], markers[ex["id"]])
        counts[status] += 1
        if located is not None:
            kept.append({"id": ex["id"], "context": located["context"], "question": fields["question"],
                         "answers": [{"text": located["answer"], "answer_start": located["answer_start"]}]})
    counts["total"] = len(examples)
    return kept, counts


def translate_quoted(examples: list[dict], translator, src: str, tgt: str, path: Path, part: int = SYNC_EVERY,
                     desc: str = "translate") -> list[tuple[dict, str]]:
    """QA examples translated with their answers as the official code translates them
    (run_translate.py): each context ``quote_mark``ed as the data holds it, the translation read
    by ``quote_locate``; ``(found, question)`` per example, the question without quote marks."""
    marked = [{"id": ex["id"], "context": quote_mark(ex), "question": ex["question"]} for ex in examples]
    translated = translate_examples(marked, ["context", "question"], src, tgt, translator, path, part, desc)
    return [(quote_locate(fields["context"]), fields["question"].replace(QUOTE, "")) for fields in translated]


def project_qa_quotes(examples: list[dict], translator, src: str, tgt: str, path: Path, part: int = SYNC_EVERY,
                      desc: str = "translate-train") -> tuple[list[dict], dict]:
    """Translate QA examples with their answers as the official code does (``translate_quoted``);
    drop an item whose translation kept no mark or marks an empty answer
    (filter_qa_translations_multi). Returns the kept examples and the counts."""
    kept, counts = [], {"kept": 0, "lost": 0, "empty": 0}
    for ex, (found, question) in zip(examples, translate_quoted(examples, translator, src, tgt, path, part, desc)):
        status = "lost" if found["answer_start"] == -1 else "empty" if not found["answer"] else "kept"
        counts[status] += 1
        if status == "kept":
            kept.append({"id": ex["id"], "context": found["context"], "question": question,
                         "answers": [{"text": found["answer"], "answer_start": found["answer_start"]}]})
    counts["total"] = len(examples)
    return kept, counts


def translation_quality(hypotheses: list[str], references: list[str]) -> dict:
    """chrF and BLEU (sacrebleu) of MT output against human translations."""
    import sacrebleu

    return {"chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score, "n": len(hypotheses)}

