"""Sweeps through the real `slurm` launcher config on a single-node SLURM cluster
(scripts/slurm/start_single_node.sh; .ci/run starts it and runs these with `make test-slurm`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "scripts" / "slurm" / "bin"


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster here: bash scripts/slurm/start_single_node.sh"),
]
LAUNCH = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
          "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5",
          "model=tiny-bert", "task=demo", "mt=gold", "lang=dma", "data.max_test=24", "train.batch_size=16",
          "stage1.batch_size=16"]


def _env():
    return dict(os.environ, PATH=f"{SHIM}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                WANDB_MODE="disabled")


@pytest.fixture(autouse=True)
def _queue_emptied_after():
    """Whatever a test leaves in the queue (a failed one its still running jobs) is cancelled before
    the next starts: a job left running would be taken for the next test's."""
    yield
    subprocess.run(["scancel", "--partition=debug"], check=False)
    deadline = time.time() + 120
    while time.time() < deadline and subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        time.sleep(1)


def test_two_job_array_through_the_slurm_launcher(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *LAUNCH, "method=lora,flare", "data.max_train=48",
                           "train.epochs=1", "stage1.epochs=1", f"output_dir={tmp_path}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'slurm'" in done.stderr + done.stdout
    finished = sorted(p.parts[-4] for p in tmp_path.glob("runs/demo/tiny-bert/gold/*/dma/seed100-*/results.json"))
    assert finished == ["flare", "lora"]
    (summary,) = tmp_path.glob("sweeps/*/summary.csv")
    assert len(summary.read_text().splitlines()) == 3
    assert list(tmp_path.glob("sweeps/*/.submitit/*_1"))  # it really was a job array


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """A sweep through the slurm launcher, running in the background (output: stdout)."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *LAUNCH, *overrides, f"output_dir={tmp_path}"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _scancel_when(job: subprocess.Popen, pick, *options: str) -> str | None:
    """While ``job`` runs (10 minutes at most), the first SLURM job that ``pick(running job ids)``
    names gets ``scancel *options``; its id."""
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        time.sleep(1)
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
        chosen = pick([line.split()[0] for line in queue.splitlines() if line.endswith("RUNNING")])
        if chosen:
            subprocess.run(["scancel", *options, chosen], check=True)
            return chosen
    return None


def test_a_killed_job_is_reported_and_the_others_finish(tmp_path):
    job = _sweep(tmp_path, "method=zero_shot,flare", "train.epochs=40", "stage1.epochs=40")

    def flare_in_stage1(running):
        # Cancel while stage 1 is being trained: the FLARE job then has at least its whole stage 2
        # left, longer than the test cluster's KillWait (2 s; submitit ignores the SIGTERM that
        # scancel sends first), so it dies before it can write a result. If it held the stage-1
        # lock, the zero-shot job takes the lock over and resumes from the stage-1 checkpoint.
        flare = [j for j in running if j.endswith("_1")]
        stage1_started = any(tmp_path.glob("stage1/*/*/*.lock"))
        stage1_done = any(tmp_path.glob("stage1/*/*/*/stage1.json"))
        return flare[0] if flare and stage1_started and not stage1_done else None

    killed = _scancel_when(job, flare_in_stage1)
    assert killed, "the FLARE job never ran long enough to be killed"
    output, _ = job.communicate(timeout=600)  # bounded: the dead job is seen, not waited on
    assert job.returncode == 1, output[-3000:]
    assert f"SLURM job {killed}" in output and "CANCELLED" in output
    assert "1 of 2 job(s) of the sweep failed; the others finished" in output
    assert list(tmp_path.glob("runs/demo/tiny-bert/gold/zero_shot/dma/seed100-*/results.json"))
    assert not list(tmp_path.glob("runs/demo/tiny-bert/gold/flare/dma/seed100-*/results.json"))


def test_a_preempted_job_is_requeued_resumes_and_is_not_reported_failed(tmp_path):
    """Pre-emption as SLURM announces it (USR2, the launcher's signal): submitit checkpoints the
    job, requeues it (`scontrol requeue`) and ends the running attempt with SystemExit; the job
    runs again, resumes stage 2 from its checkpoint and finishes. No FAILED marker may remain."""
    job = _sweep(tmp_path, "method=flare", "train.epochs=30", "train.checkpoint_every=2", "data.max_train=48",
                 "stage1.epochs=1")

    def checkpointed(running):  # stage 2 has written a checkpoint to resume from
        ready = list(tmp_path.glob("runs/demo/tiny-bert/gold/flare/dma/seed100-*/checkpoint"))
        return running[0] if running and ready else None

    signalled = _scancel_when(job, checkpointed, "--signal=USR2")
    assert signalled, "stage 2 never wrote a checkpoint"
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert list(tmp_path.glob("runs/demo/tiny-bert/gold/flare/dma/seed100-*/results.json"))
    assert not list(tmp_path.glob("sweeps/*/*/FAILED"))
    logs = " ".join(p.read_text() for p in tmp_path.glob(f"sweeps/*/.submitit/{signalled}*/*log.*"))
    assert "preempted" in logs and "Resuming stage 2" in logs


def test_two_jobs_sharing_one_translation_cache_write_each_record_once(tmp_path):
    """Two jobs of one array translate the same split at the same time (a slow stand-in MT): one
    writes the cache, the other waits and reads it."""
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *LAUNCH, "stage=translate", "mt=fake",
                           "mt.delay_s=2", "mt.batch_size=16", "data.max_train=48", "seed=1,2",
                           f"output_dir={tmp_path}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (cache,) = tmp_path.glob("translations/demo/train/en-x-dma/*.jsonl")
    ids = [json.loads(line)["id"] for line in cache.read_text().splitlines()]
    assert len(ids) == 48 and len(set(ids)) == 48


def test_a_chained_three_stage_sweep_starts_stage2_after_its_inputs(tmp_path):
    """python -m flare_exp.sweep --launcher slurm: translation, stage 1 and stage 2 submitted at
    once as three arrays; stage 2 waits through SLURM (afterany) and starts after both finished
    (a stage-2 job started earlier would fail at once: its inputs would be missing)."""
    overrides = [a for a in LAUNCH if a not in ("-m", "hydra/launcher=slurm", "mt=gold")]
    done = subprocess.run([sys.executable, "-m", "flare_exp.sweep", "experiment=demo", "--launcher", "slurm", "--wait",
                           *overrides, "mt=fake", "hydra.sweeper.params.method='lora,flare'", "data.max_train=48",
                           "train.epochs=1", "stage1.epochs=3", f"output_dir={tmp_path}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("== ")] == [
        "== translate", "== stage1", "== stage2"]
    (chain,) = tmp_path.glob("chains/demo-*")
    assert {p.name for p in chain.iterdir()} == {"translate.ids", "stage1.ids", "stage2.ids"}
    (stage1,) = tmp_path.glob("stage1/demo/tiny-bert/*/stage1.json")
    caches = list(tmp_path.glob("translations/demo/*/*/*.jsonl"))
    results = sorted(tmp_path.glob("runs/demo/tiny-bert/fake/*/dma/seed100-*/results.json"))
    assert sorted(p.parts[-4] for p in results) == ["flare", "lora"] and len(caches) == 3
    inputs_done = max([stage1.stat().st_mtime, *(c.stat().st_mtime for c in caches)])
    for path in results:
        assert json.loads(path.read_text())["timing"]["started_at"] >= inputs_done, path
    assert not list(tmp_path.glob("sweeps/*/*/FAILED"))
    # Submitted again: stage 1 and stage 2 are done and not submitted (their job-id files empty,
    # so nothing waits on them); translation jobs find their caches complete and end.
    written = {p: p.stat().st_mtime_ns for p in results}
    again = subprocess.run(done.args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "1 of 1 job(s) of the sweep already done" in output and "2 of 2 job(s) of the sweep already done" in output
    assert [p.read_text().strip() for p in sorted(max(tmp_path.glob("chains/demo-*")).glob("stage*.ids"))] == ["", ""]
    assert {p: p.stat().st_mtime_ns for p in results} == written


def test_a_stage_waits_for_the_earlier_ones_to_end_not_to_succeed(tmp_path):
    """A sweep chained after an earlier stage's array starts once that array has ended, even
    where one of its jobs failed (SLURM afterany): with afterok one failed stage-1 or translation
    job of hundreds left every stage-2 job pending for ever. Stage-2 jobs whose own inputs are
    missing fail at once, naming the stage to run (tests/test_fail_fast.py); the others run."""
    failed = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--mem=100M", "--time=1",
                             f"--output={tmp_path}/failed.out", "--wrap", "exit 3"],
                            capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    ids = tmp_path / "earlier.ids"
    ids.write_text(failed + "\n")
    job = _sweep(tmp_path, "method=lora", "data.max_train=48", "train.epochs=1", f"chain.after=[{ids}]")
    deadline, never = time.time() + 600, None
    while job.poll() is None and time.time() < deadline and never is None:
        time.sleep(2)
        queue = subprocess.run(["squeue", "-h", "-o", "%i %r"], capture_output=True, text=True).stdout
        never = next((line for line in queue.splitlines() if "DependencyNeverSatisfied" in line), None)
    if job.poll() is None:
        job.kill()  # its jobs are cancelled after the test
    output = job.communicate()[0]
    assert never is None, f"the chained sweep can never start after a failed earlier job: {never}"
    assert job.returncode == 0, output[-3000:]
    assert f"after {failed}" in output
    assert list(tmp_path.glob("runs/demo/tiny-bert/gold/lora/dma/seed100-*/results.json"))


def test_a_sweep_submitted_again_submits_only_the_jobs_not_done(tmp_path):
    """Submitting a sweep again (after failures, pre-emptions or with more methods) spends no GPU
    allocation on the jobs that finished: they are not submitted, and the summary still lists them."""
    common = [sys.executable, str(ROOT / "run.py"), *LAUNCH, "data.max_train=48", "train.epochs=1", "stage1.epochs=1",
              f"output_dir={tmp_path}"]
    first = subprocess.run([*common, "method=lora"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*common, "method=lora,zero_shot"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=900)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "1 of 2 job(s) of the sweep already done: not submitted" in output and "(1 jobs)" in output
    summary = max(tmp_path.glob("sweeps/*/summary.csv"), key=lambda p: p.stat().st_mtime)
    assert sorted(line.split(",")[3] for line in summary.read_text().splitlines()[1:]) == ["lora", "zero_shot"]
