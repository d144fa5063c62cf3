"""The errors a run reports in one sentence, without a traceback (run.py prints them)."""


class ConfigError(ValueError):
    """A combination of config choices that cannot run."""


class InputsMissing(ConfigError):
    """A stage-2 job whose stage 1 or translations are not there yet."""
