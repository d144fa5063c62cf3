"""A decoder's training step with the loss on the answer tokens from their logits alone (what the
pipeline does) against the model's own loss over logits at every position, side by side.

    python scripts/bench_answer_loss.py --model smollm2 --batch 16 --length 64
    python scripts/bench_answer_loss.py --model llama3.1-8b --quantization nf4 --dtype bfloat16 --batch 32   # GPU

A classification batch of the pipeline's batcher (scripts/bench.py's ``batch_for``): ``--length``
tokens per row, the prompt, then the answer (the label's tokens and EOS). Each method's model
(scripts/bench.py's ``build``)
takes one step of each kind in turn (interleaved); the figures are medians over ``--reps``, and
the ratio is answer-only over all positions, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODELS, batch_for, build, timed, train_step  # noqa: E402
from bench_memory import Memory  # noqa: E402

from flare_exp.train import _optimization, answers_last  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[m for m in MODELS if m not in ("minilm", "xlmr-large")], default="smollm2")
    parser.add_argument("--methods", default="lora,flare-add_relu")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    args.source_length, args.gradient_checkpointing = None, False  # what scripts/bench.py's build reads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = Memory(device)
    print(f"{args.model}, batch {args.batch} x {args.length} tokens, "
          f"{'cuda' if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'}")
    for method in args.methods.split(","):
        model, setup = build(method, args, device, None)
        if not answers_last(model, setup.batcher):
            raise SystemExit(f"{args.model} is not a decoder whose forward keeps the last logits alone.")
        optimizer = _optimization(model, setup.cfg.train, args.batch)[1]
        times, peaks = {True: [], False: []}, {True: [], False: []}
        for rep in range(args.warmup + args.reps):
            batch = {k: v.to(device) for k, v in batch_for(setup, args, rep).items()}
            for answer_only in ((True, False) if rep % 2 == 0 else (False, True)):
                before = memory.start()
                seconds = timed(lambda: train_step(model, optimizer, batch, args.autocast, answer_only), device)
                if rep >= args.warmup:
                    times[answer_only].append(seconds)
                    peaks[answer_only].append(memory.peak() - before)
        all_s, answer_s = statistics.median(times[False]), statistics.median(times[True])
        all_mb, answer_mb = max(peaks[False]) / 2**20, max(peaks[True]) / 2**20
        print(f"{method}: step {all_s:.3f} s -> {answer_s:.3f} s (x{answer_s / all_s:.3f}); "
              f"step's peak above the held memory {all_mb:.0f} MB -> {answer_mb:.0f} MB (x{answer_mb / all_mb:.3f})")


if __name__ == "__main__":
    main()
