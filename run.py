"""The one entry point: `python run.py [group=option ...]`, `python run.py -m method=flare,lora lang=sw,te`.

Offline default main job: `python run.py experiment=demo` (make run).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers.utils import logging as hf_logging

from flare_exp.data import DataError
from flare_exp.pipeline import ConfigError, run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hf_logging.set_verbosity_error()  # e.g. the expected "newly initialized classifier" report
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, job_dir)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "FAILED").write_text("this job raised; its log says why\n")
        raise


if __name__ == "__main__":
    main()
