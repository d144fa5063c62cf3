"""Which jobs an experiment declares: its sweep parameters and every job's composed config, from
the experiment file alone (no model library)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ..memory import fitted
from ..record import run_dir

CONF = Path(__file__).resolve().parent.parent.parent / "conf"


def split_experiment(overrides: list[str]) -> tuple[str, list[str]]:
    """(the one ``experiment=<name>`` among command-line overrides, the other overrides)."""
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if len(experiments) != 1:
        raise SystemExit("error: name exactly one experiment=<name>.")
    return experiments[0], [o for o in overrides if not o.startswith("experiment=")]

def sweep_params(experiment: str, overrides: list[str]) -> dict[str, list[str]]:
    """The sweep parameters of ``experiment`` (name -> values)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    return {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}

def compose_jobs(experiment: str, overrides: list[str], choices: list[dict]) -> list[DictConfig]:
    """The composed config of each job of ``experiment`` with ``overrides`` and its ``choices``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    base = [f"experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [compose(config_name="config", overrides=[*base, *(f"{k}={v}" for k, v in choice.items())])
                for choice in choices]


def sweep_configs(experiment: str, overrides: list[str], fit: bool = True) -> list[tuple[dict, DictConfig]]:
    """(choices, composed config) of every job of ``experiment``'s sweep; ``fit``: as the job runs,
    with the memory remedy it needs applied (``flare_exp.memory.fitted``)."""
    params = sweep_params(experiment, overrides)
    choices = [dict(zip(params, values)) for values in itertools.product(*params.values())]
    jobs = list(zip(choices, compose_jobs(experiment, overrides, choices)))
    return [(choice, fitted(cfg)) for choice, cfg in jobs] if fit else jobs


def expected_runs(experiment: str, overrides: list[str]) -> list[tuple[dict, Path]]:
    """(choices, run directory) of every job of ``experiment``'s sweep."""
    return [(choice, run_dir(cfg)) for choice, cfg in sweep_configs(experiment, overrides)]


def command(main: Callable[[], object]) -> int:
    """Run a command's ``main``; a bad experiment or setting (an unknown method, a config that
    does not compose) ends it with its one-sentence message and exit status 2, no traceback."""
    from hydra.errors import HydraException

    try:
        returned = main()
    except (ValueError, HydraException) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return returned if isinstance(returned, int) else 0
