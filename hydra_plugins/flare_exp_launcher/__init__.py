"""The SLURM launcher of the sweeps: hydra-submitit-launcher's, tolerant of jobs that die
without a result (killed, out of memory, a lost node). Such a job is recorded as FAILED in its
sweep folder and the sweep ends with the others' results and summary, instead of stopping at
the first dead job. (Python errors inside a job are caught by run.py itself; a job that submitit
requeues after a pre-emption or timeout is no failure: the launcher goes on waiting for it.)

It overrides the launcher's own ``launch`` (submission as hydra-submitit-launcher does it, then
its own collection of results) and touches nothing inside submitit.

Chained stages (``python -m flare_exp.sweep``): ``chain.after`` names the job-id files of the
sweeps this one waits for (SLURM ``--dependency=afterany``: no job holds a GPU while it waits, and
one failed job of an earlier array does not hold back the rest: a job whose own inputs are missing
fails at once, naming the stage to run),
``chain.ids_file`` where this sweep's job ids go, and ``chain.wait: false`` submits and returns.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


class TolerantSlurmLauncher(SlurmLauncher):
    def submit(self, numbered: list[tuple[int, list[str]]]) -> list:
        """One job array of the sweep's jobs ((number, overrides); hydra-submitit-launcher's
        parameters); its jobs."""
        import submitit

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
                                         if "max_num_timeout" in self.params else {})
        queue = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in queue else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        chain = self.config.get("chain") or {}
        after = [i for path in chain.get("after") or [] for i in Path(path).read_text().split()]
        if after:  # start once every job of the earlier stages has ended (afterok would never start
            # any job after one failure; a job whose inputs are missing fails at once instead)
            extra = dict(self.params.get("additional_parameters") or {})
            executor.update_parameters(slurm_additional_parameters={**extra, "dependency": "afterany:" + ":".join(after)})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        params = []
        for number, overrides in numbered:
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params)) if params else []
        if chain.get("ids_file"):  # empty where nothing was submitted: a later stage then waits for nothing
            ids = Path(chain["ids_file"])
            ids.parent.mkdir(parents=True, exist_ok=True)
            ids.write_text(" ".join(sorted({job.job_id.split("_")[0] for job in jobs})) + "\n")
        if jobs:
            log.info(f"Submitted SLURM job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} jobs)"
                     + (f", after {' '.join(after)}" if after else ""))
        return jobs

    def launch(self, job_overrides, initial_job_idx):
        """Submit the jobs whose work is not done yet (``flare_exp.record.finished``: a run's or
        an evaluation's results, a cached stage 1): a sweep submitted again after failures or
        pre-emptions spends no GPU allocation on the jobs that had finished."""
        numbered = list(enumerate(job_overrides, start=initial_job_idx))
        todo = [(number, overrides) for number, overrides in numbered if not self._finished(number, overrides)]
        if len(todo) < len(numbered):
            log.info(f"{len(numbered) - len(todo)} of {len(numbered)} job(s) of the sweep already done: not submitted "
                     "(force=true reruns them)")
        jobs, submitted = self.submit(todo), {number for number, _ in todo}
        done = [self.completed(overrides) for number, overrides in numbered if number not in submitted]
        if not (self.config.get("chain") or {}).get("wait", True):
            return done + [self.submitted(job) for job in jobs]
        return done + [self.result(job) for job in jobs]

    def _finished(self, number: int, overrides) -> bool:
        """Whether the job's work is done; a finished run's job folder then points at its results,
        so that the sweep's summary lists it."""
        from flare_exp.memory import fitted
        from flare_exp.record import POINTER, RESULTS, finished, run_dir, write_json_atomic

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            del cfg["hydra"]
        cfg = fitted(cfg)  # as the job will run: with its memory remedy
        if not finished(cfg):
            return False
        if cfg.stage in ("run", "stage2"):
            write_json_atomic(Path(str(self.config.hydra.sweep.dir)) / str(number) / POINTER,
                              {"results": str(run_dir(cfg) / RESULTS)})
        return True

    @staticmethod
    def completed(overrides) -> JobReturn:
        """The return of a job not submitted because its work was done."""
        returned = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        returned._return_value = None
        return returned

    @classmethod
    def submitted(cls, job) -> JobReturn:
        """A completed return without a value: for a job submitted and not waited for (its results
        come later), or one that died without a result (its FAILED marker carries the failure)."""
        return cls.completed(job.submission().args[0])

    def result(self, job) -> JobReturn:
        """The job's return, or for a job that died without one a FAILED marker in its folder and
        a completed return (Hydra's sweeper would re-raise a failed one and stop the summary: the
        marker carries the failure, and the summary exits non-zero)."""
        from submitit.core.utils import UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError as error:
            overrides, _, index = job.submission().args[:3]
            folder = Path(str(self.config.hydra.sweep.dir)) / str(index)
            folder.mkdir(parents=True, exist_ok=True)
            summary = " ".join(str(error).splitlines()[:2])
            (folder / "FAILED").write_text(f"{' '.join(overrides)}\nSLURM job {job.job_id}: {summary}\n")
            return self.submitted(job)
