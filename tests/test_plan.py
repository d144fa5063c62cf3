"""The sweep planner: jobs per stage, what is done, GPU-hours from the throughput table."""

from __future__ import annotations

import csv
import math

import pytest

from flare_exp.plan import STARTUP_S, format_plan, plan
from flare_exp.record import run_dir, stage1_dir
from flare_exp.report.experiments import sweep_configs


def _table(path, step_s: float, source: str = "measured"):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "method", "gradient_checkpointing", "batch", "length",
                                               "step_s", "tokens_per_s", "peak_gb", "source", "device", "date"])
        writer.writeheader()
        for method in ("lora", "flare-add_relu"):
            writer.writerow({"model": "minilm", "method": method, "gradient_checkpointing": "False", "batch": 32,
                             "length": 128, "step_s": step_s * (2 if method != "lora" else 1), "tokens_per_s": 1,
                             "peak_gb": 1, "source": source, "device": "x", "date": "d"})
    return path


def test_the_plan_counts_jobs_done_and_hours(tmp_path):
    out = tmp_path / "out"
    table = _table(tmp_path / "throughput.csv", step_s=3.6)
    stages = plan("demo", [f"output_dir={out}"], table)
    assert {k: (s["jobs"], s["done"]) for k, s in stages.items()} == {
        "translate": (0, 0), "stage1": (1, 0), "stage2": (4, 0)}  # mt=gold: nothing to translate
    # stage 1: 300 English examples, batch 16, 4 epochs; 3.6 s at batch 32 x 128 tokens, scaled
    # to batch 16 and the demo's length
    jobs = sweep_configs("demo", [f"output_dir={out}"])
    cfg = jobs[0][1]
    step = 3.6 * (16 / 32) * (cfg.task.max_length / 128)
    assert stages["stage1"]["hours"] == pytest.approx((STARTUP_S + math.ceil(300 / 16) * 4 * step) / 3600)
    assert stages["stage1"]["sources"] == ["measured"]
    # one stage 1 and one run finished: counted done, their hours no longer planned
    (stage1_dir(cfg)).mkdir(parents=True)
    (stage1_dir(cfg) / "stage1.json").write_text("{}")
    flare = next(c for choice, c in jobs if choice["method"] == "flare")
    run_dir(flare).mkdir(parents=True)
    (run_dir(flare) / "results.json").write_text("{}")
    after = plan("demo", [f"output_dir={out}"], table)
    assert (after["stage1"]["done"], after["stage1"]["hours"]) == (1, 0.0)
    assert after["stage2"]["done"] == 1 and after["stage2"]["hours"] < stages["stage2"]["hours"]
    text = format_plan("demo", after)
    assert "| stage1 | 1 | 1 | 0 | – |" in text and "| stage2 | 4 | 1 | 3 |" in text


def test_a_method_without_its_own_row_is_an_estimate(tmp_path):
    table = _table(tmp_path / "throughput.csv", step_s=1.0)
    stages = plan("demo", [f"output_dir={tmp_path}", "hydra.sweeper.params.method=xmixup"], table)
    assert stages["stage2"]["sources"] == ["estimate"]  # X-Mixup costed as FLARE's measured row
