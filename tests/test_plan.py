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
    assert {k: (s["jobs"], s["done"]) for k, s in stages.items() if k != "memory"} == {
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


def test_at_its_measured_size_the_memory_estimate_is_the_measured_peak(make_cfg):
    from flare_exp import memory

    cfg = make_cfg(["model=llama3.1-8b", "task=tydiqa"])
    for method in ("lora", "flare-add_relu", "input_fusion"):
        for checkpointing in (False, True):
            row = memory.throughput_table()[("llama3.1-8b", method, checkpointing)]
            assert memory.peak_gb(cfg.model, row, 32, 128, checkpointing) == pytest.approx(float(row["peak_gb"]))


def test_a_job_that_does_not_fit_its_gpu_gets_a_remedy_that_keeps_its_effective_batch(make_cfg):
    from flare_exp import memory
    from flare_exp.errors import ConfigError

    cfg = make_cfg(["model=llama3.1-8b", "task=tydiqa", "method=flare", "lang=sw"])  # 32 x 384, 80 GB
    fit = memory.job_fits(cfg)[("stage2", "tydiqa", "llama3.1-8b", "flare", 384)]
    assert fit.peak_gb > 0.95 * 80 and fit.remedy == {"train.gradient_checkpointing": True} and fit.fits
    fitted = memory.fitted(cfg)
    assert fitted.train.gradient_checkpointing and fitted.stage1.gradient_checkpointing
    assert (fitted.train.batch_size, fitted.train.grad_accum) == (32, 1)
    assert memory.fitted(fitted) == fitted  # a fitted job fits as it is
    # mT5-XL has no checkpointed row: micro-batches with accumulation, the same effective batch
    mt5 = memory.fitted(make_cfg(["model=mt5-xl", "task=tydiqa", "method=input_fusion", "lang=sw"]))
    assert mt5.train.batch_size * mt5.train.grad_accum == 32 and mt5.train.batch_size < 32
    # NusaX at 128 tokens fits an 80 GB GPU as configured
    nusax = make_cfg(["model=llama3.1-8b", "task=nusax", "method=flare", "lang=jav"])
    assert memory.fitted(nusax) == nusax
    with pytest.raises(ConfigError, match=r"needs about \d+ GB on a 4 GB GPU .* cannot run there"):
        memory.fitted(make_cfg(["model=llama3.1-8b", "task=tydiqa", "method=flare", "cluster.gpu_memory_gb=4"]))


def test_the_official_trained_lm_head_and_embeddings_enter_the_memory_estimate(make_cfg):
    from flare_exp import memory

    common = ["task=nusax", "method=lora", "lang=jav"]
    key = ("stage2", "nusax", "llama3.1-8b", "lora", 128)
    sound = memory.job_fits(make_cfg(["model=llama3.1-8b", *common]))[key].peak_gb
    head = memory.job_fits(make_cfg(["model=llama3.1-8b", *common, "protocol.decoder_lm_head=trained"]))[key].peak_gb
    both = memory.job_fits(make_cfg(["model=llama3.1-8b", *common, "protocol.decoder_lm_head=trained",
                                     "protocol.llama_pad_token=new_token"]))[key].peak_gb
    # 128256 x 4096 parameters a matrix: bf16 gradients and 8-bit AdamW's two states, 4 bytes each
    assert head - sound == pytest.approx(128256 * 4096 * 4 / 1e9) and both - sound == pytest.approx(2 * (head - sound))
    gemma = [("stage2", "nusax", "gemma2-9b", "lora", 128), ["model=gemma2-9b", *common]]
    tied = memory.job_fits(make_cfg([*gemma[1], "protocol.decoder_lm_head=trained", "protocol.llama_pad_token=new_token"]))
    assert tied[gemma[0]].peak_gb - memory.job_fits(make_cfg(gemma[1]))[gemma[0]].peak_gb == pytest.approx(256000 * 3584 * 4 / 1e9)


def test_the_memory_estimate_reads_the_protocols_input_length(make_cfg):
    from flare_exp import memory

    # the official 128 tokens of TyDiQA (protocol.max_length), not the task's 384: no remedy needed
    cfg = make_cfg(["model=llama3.1-8b", "task=tydiqa", "method=flare", "lang=sw", "protocol.max_length=128"])
    fits = memory.job_fits(cfg)
    assert set(fits) == {("stage1", "tydiqa", "llama3.1-8b", "lora", 128), ("stage2", "tydiqa", "llama3.1-8b", "flare", 128)}
    assert all(f.fits and not f.remedy for f in fits.values())
    doubled = memory.job_fits(make_cfg(["model=xlmr-large", "task=tydiqa", "method=input_fusion", "lang=sw",
                                        "protocol.max_length=128"]))
    assert ("stage2", "tydiqa", "xlmr-large", "input_fusion", 256) in doubled


def test_the_official_fp32_unquantised_weights_enter_the_memory_estimate(make_cfg):
    from flare_exp import memory

    common = ["model=llama3.1-8b", "task=nusax", "method=lora", "lang=jav"]
    key = ("stage2", "nusax", "llama3.1-8b", "lora", 128)
    sound, official = (memory.job_fits(make_cfg([*common, *extra]))[key].peak_gb
                       for extra in ([], ["protocol.unquantised_dtype=float32"]))
    cfg = make_cfg([*common, "protocol.unquantised_dtype=float32"])
    assert memory.activation_scale(cfg) == 2 and memory.unquantised_gb(cfg) == pytest.approx(2 * 128256 * 4096 * 2 / 1e9)
    row = memory.throughput_table()[("llama3.1-8b", "lora", False)]
    weights = memory.weights_gb(cfg.model)
    assert official == pytest.approx(memory.unquantised_gb(cfg) + weights + 2 * (float(row["peak_gb"]) - weights))
    assert official > sound


def test_the_plan_sums_the_disk_the_trained_lm_heads_and_embeddings_take(tmp_path):
    """Each trained job of a decoder under the official head and pad settings saves its LM head and
    embeddings (bf16 here, 128256 x 4096 each); stage 2 saves them only with train.save_adapter."""
    from flare_exp.methods import method_for

    common = [f"output_dir={tmp_path}", "model=llama3.1-8b", "protocol.decoder_lm_head=trained",
              "protocol.llama_pad_token=new_token"]
    stages = plan("demo", common)
    matrices = 2 * 128256 * 4096 * 2 / 1e9
    trained = sum(method_for(cfg.method).trains for _, cfg in sweep_configs("demo", common, fit=False))
    assert trained >= 1
    assert stages["stage1"]["disk_gb"] == pytest.approx(stages["stage1"]["jobs"] * matrices)
    assert stages["stage2"]["disk_gb"] == pytest.approx(trained * matrices)
    assert f"stage2 {trained * matrices:,.0f} GB" in format_plan("demo", stages)
    unsaved = plan("demo", [*common, "train.save_adapter=false"])
    assert unsaved["stage2"]["disk_gb"] == 0 and unsaved["stage1"]["disk_gb"] == stages["stage1"]["disk_gb"]
    assert plan("demo", [f"output_dir={tmp_path}"])["stage2"]["disk_gb"] == 0  # an encoder saves its adapters only


def test_a_4bit_decoder_the_protocol_checkpoints_is_estimated_checkpointed_without_a_remedy(make_cfg, tmp_path):
    """protocol.kbit_gradient_checkpointing checkpoints a 4-bit decoder's training whatever
    train.gradient_checkpointing says: its memory and step time are the checkpointed row's, and it
    needs no checkpointing remedy (which would change the job's config for nothing)."""
    from flare_exp import memory
    from flare_exp.plan import _step

    common = ["model=llama3.1-8b", "task=tydiqa", "method=flare", "lang=sw", "protocol.max_length=128"]
    by_protocol = make_cfg([*common, "protocol.kbit_gradient_checkpointing=true"], tmp_path)
    by_train = make_cfg([*common, "train.gradient_checkpointing=true", "stage1.gradient_checkpointing=true"], tmp_path)
    fits, expected = memory.job_fits(by_protocol), memory.job_fits(by_train)
    assert fits.keys() == expected.keys() and all(not f.remedy for f in fits.values())
    assert all(fits[k].peak_gb == pytest.approx(expected[k].peak_gb) for k in fits)
    assert memory.fitted(by_protocol).train.gradient_checkpointing is False  # no override written
    table = memory.throughput_table()
    from flare_exp.methods import method_for
    assert _step(table, by_protocol, method_for(by_protocol.method), "train") == \
        _step(table, by_train, method_for(by_train.method), "train")
    unchecked = make_cfg(common, tmp_path)
    assert _step(table, unchecked, method_for(unchecked.method), "train")[0] < \
        _step(table, by_train, method_for(by_train.method), "train")[0]
