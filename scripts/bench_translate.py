"""Throughput of the translation stage (examples and tokens per second) on this machine.

    python scripts/bench_translate.py                         # a tiny random NLLB-shaped model (offline)
    python scripts/bench_translate.py --model facebook/nllb-200-distilled-600M --n 512   # on a GPU
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from flare_exp.translate import NLLBTranslator, build_tiny_nllb, translate_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an NLLB model name or folder; default: a tiny random one")
    parser.add_argument("--n", type=int, default=256, help="sentences to translate")
    parser.add_argument("--words", type=int, default=20, help="words per sentence")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-translate-"))
    model = args.model or str(build_tiny_nllb(work / "tiny-nllb"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    translator = NLLBTranslator(model, beams=args.beams, max_length=args.max_length,
                                batch_size=args.batch_size, device=device)
    vocab = [f"w{i}" for i in range(60)]
    examples = [{"id": str(i), "text": " ".join(vocab[(i * 7 + j) % 60] for j in range(args.words - i % 5))}
                for i in range(args.n)]
    start = time.perf_counter()
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", translator, work / "cache.jsonl",
                       batch_size=args.batch_size * 4)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", translator, work / "cache.jsonl")
    cached = time.perf_counter() - start
    tokens = sum(len(translator.tokenizer(e["text"])["input_ids"]) for e in examples)
    print(f"model {model} on {device}, beams {args.beams}, max length {args.max_length}, batch {args.batch_size}")
    print(f"translated {args.n} sentences ({tokens} source tokens) in {fresh:.2f} s: "
          f"{args.n / fresh:.1f} sentences/s, {tokens / fresh:.0f} source tokens/s")
    print(f"read back from the cache in {cached:.3f} s ({args.n / cached:.0f} sentences/s)")


if __name__ == "__main__":
    main()
