"""Throughput of the translation stage, side by side in one run: the pipeline's
``translate_examples`` (the split sorted by length, batches sized by tokens, one fsync per part)
against chunks of ``--batch-size`` examples in data order, each sorted inside and synced (how the
stage ran before 2026-12-01), on the same sentences, model and settings.

    python scripts/bench_translate.py                         # a tiny random NLLB-shaped model (offline)
    python scripts/bench_translate.py --model facebook/nllb-200-distilled-600M --n 2048   # on a GPU
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flare_exp.translate import NLLBTranslator, build_tiny_nllb, translate_examples


def chunked(examples, translator, path: Path, batch_size: int) -> None:
    """The reference: ``batch_size`` examples at a time in data order, an fsync after each."""
    with path.open("a", encoding="utf-8") as out:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            old = translator.batch_size
            translator.batch_size = len(chunk)  # one generate call per chunk, as before
            try:
                texts = translator.translate([ex["text"] for ex in chunk], "eng_Latn", "swh_Latn")
            finally:
                translator.batch_size = old
            for ex, text in zip(chunk, texts):
                out.write(json.dumps({"id": ex["id"], "fields": {"text": text}}) + "\n")
            out.flush()
            os.fsync(out.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an NLLB model name or folder; default: a tiny random one")
    parser.add_argument("--n", type=int, default=512, help="sentences to translate")
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=60, help="sentence lengths spread as a real split's")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="mt.batch_size")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-translate-"))
    model = args.model or str(build_tiny_nllb(work / "tiny-nllb"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    translator = NLLBTranslator(model, beams=args.beams, max_length=args.max_length,
                                batch_size=args.batch_size, device=device)
    vocab, rng = [f"w{i}" for i in range(60)], random.Random(0)
    examples = [{"id": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(args.min_words,
                                                                                          args.max_words)))}
                for i in range(args.n)]
    tokens = sum(len(ids) for ids in translator.tokenizer([e["text"] for e in examples])["input_ids"])
    times = {"before": [], "after": []}
    for rep in range(args.reps):  # interleaved
        for name in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            path = work / f"{name}-{rep}.jsonl"
            start = time.perf_counter()
            if name == "before":
                chunked(examples, translator, path, args.batch_size)
            else:
                translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", translator, path)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"model {model} on {device}, beams {args.beams}, max length {args.max_length}, mt.batch_size "
          f"{args.batch_size}; {args.n} sentences of {args.min_words}-{args.max_words} words ({tokens} source "
          f"tokens); medians of {args.reps} interleaved repetitions")
    print(f"before (chunks of {args.batch_size} in data order): {args.n / before:.1f} sentences/s, "
          f"{tokens / before:.0f} source tokens/s, {-(-args.n // args.batch_size)} fsyncs")
    print(f"after (sorted split, token-sized batches): {args.n / after:.1f} sentences/s, {tokens / after:.0f} "
          f"source tokens/s, {-(-args.n // 1024)} fsyncs")
    print(f"after / before: {before / after:.2f}x the throughput")


if __name__ == "__main__":
    main()
