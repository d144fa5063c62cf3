"""``make gpu-check``'s CPU fallback end to end, and the throughput table it feeds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_the_cpu_fallback_runs_every_part(tmp_path):
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["cpu_fallback"] and report["device"] == "CPU (fallback)"
    assert set(report["parts"]) == {"tests", "llama8b-nf4", "llama8b-nf4-gc", "xlmr-large-bf16"}
    assert all(part["status"] == "ok" for part in report["parts"].values())
    # The correctness checks really ran: every one of tests/test_gpu.py, each passed.
    assert len(report["tests"]) >= 20 and set(report["tests"].values()) == {"passed"}
    for name, bench in report["bench"].items():
        assert list(bench["methods"]) == ["lora", "flare-add_relu", "input_fusion"], name
        assert bench["layers"] == 1 and bench["vocab"] == 2048 and bench["batch"] == 2
        assert bench["methods"]["lora"]["ratio_train"] == 1.0
        # the same trainable parameters: FLARE add_relu and input fusion add none
        assert {m["extra_params"] for m in bench["methods"].values()} == {0}
    assert report["bench"]["llama8b-nf4-gc"]["gradient_checkpointing"] is True
    assert report["bench"]["xlmr-large-bf16"]["autocast"] == "bfloat16"
    assert len(report["targets"]) == 4
    rows = list(csv.DictReader((tmp_path / "throughput.csv").open()))
    assert len(rows) == 9 and {r["source"] for r in rows} == {"measured"}
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "20 of 20 passed" in markdown or f"{len(report['tests'])} of {len(report['tests'])} passed" in markdown
    assert "not a verdict on 8B" in markdown


def test_measured_rows_replace_their_estimates(tmp_path):
    table, measured = tmp_path / "throughput.csv", tmp_path / "measured.csv"
    base = {"batch": 32, "length": 128, "tokens_per_s": 1, "peak_gb": 1, "device": "x", "date": "d"}

    def write(path, rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=gpu_check.COLUMNS)
            writer.writeheader()
            writer.writerows({**base, **r} for r in rows)

    write(table, [{"model": "m", "method": "lora", "gradient_checkpointing": "False", "step_s": 9, "source": "estimate"},
                  {"model": "m", "method": "lora", "gradient_checkpointing": "True", "step_s": 8, "source": "estimate"}])
    write(measured, [{"model": "m", "method": "lora", "gradient_checkpointing": "False", "step_s": 1,
                      "source": "measured"},
                     {"model": "n", "method": "lora", "gradient_checkpointing": "False", "step_s": 2,
                      "source": "measured"}])
    gpu_check.record(measured, table)
    rows = {(r["model"], r["gradient_checkpointing"]): r for r in csv.DictReader(table.open())}
    assert len(rows) == 3
    assert rows[("m", "False")]["source"] == "measured" and rows[("m", "False")]["step_s"] == "1"
    assert rows[("m", "True")]["source"] == "estimate"  # not measured: kept
    assert rows[("n", "False")]["step_s"] == "2"


def test_the_committed_table_marks_each_row():
    rows = list(csv.DictReader((ROOT / "docs" / "throughput.csv").open()))
    assert rows and all(r["source"] == "measured" or r["source"].startswith("estimate") for r in rows)
    assert {r["model"] for r in rows if r["source"] == "measured"} >= {"llama3.1-8b", "xlmr-large"}
