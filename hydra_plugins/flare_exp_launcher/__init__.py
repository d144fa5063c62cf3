"""The SLURM launcher of the sweeps: hydra-submitit-launcher's, tolerant of jobs that die
without a result (killed, out of memory, a lost node). Such a job is recorded as FAILED in its
sweep folder and the sweep ends with the others' results and summary, instead of stopping at
the first dead job. (Python errors inside a job are caught by run.py itself.)"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class TolerantSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from submitit.core.utils import UncompletedJobError

        results = submitit.core.core.Job.results
        sweep_dir = Path(str(self.config.hydra.sweep.dir))

        def tolerant(job):
            try:
                return results(job)
            except UncompletedJobError as error:
                overrides, _, index = job.submission().args[:3]
                folder = sweep_dir / str(index)
                folder.mkdir(parents=True, exist_ok=True)
                summary = " ".join(str(error).splitlines()[:2])
                (folder / "FAILED").write_text(f"{' '.join(overrides)}\nSLURM job {job.job_id}: {summary}\n")
                # Hydra's sweeper re-raises a FAILED return and would stop the sweep's summary:
                # the FAILED marker carries the failure, and the summary exits non-zero.
                recorded = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
                recorded._return_value = None
                return [recorded]

        with mock.patch.object(submitit.core.core.Job, "results", tolerant):
            return super().launch(job_overrides, initial_job_idx)
