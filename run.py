"""The one entry point: `python run.py [group=option ...]`, `python run.py -m method=flare,lora lang=sw,te`.

Offline default main job: `python run.py experiment=demo` (make run).
"""

import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from transformers.utils import logging as hf_logging

from flare_exp.data import DataError
from flare_exp.errors import ConfigError
from flare_exp.stages import run


# peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hf_logging.set_verbosity_error()  # e.g. the expected "newly initialized classifier" report
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, job_dir)
    except Exception as error:
        job_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(hydra_cfg.overrides.task)
        (job_dir / "FAILED").write_text(f"{overrides}\n{type(error).__name__}: {error}\n")
        expected = isinstance(error, (ConfigError, DataError))  # one sentence, no traceback
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # Recorded; the other jobs go on, and the sweep summary reports it (exit status 1).
            if expected:
                print(f"error: {error}", file=sys.stderr)
            else:
                traceback.print_exc()
            return
        if expected:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
    # Not an Exception (SystemExit, KeyboardInterrupt) leaves no marker: submitit ends a pre-empted
    # or timed-out job with SystemExit after requeueing it. A job that finishes, after a requeue
    # for instance, clears what an earlier attempt left.
    (job_dir / "FAILED").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
