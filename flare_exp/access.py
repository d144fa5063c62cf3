"""The access preflight: before a sweep submits anything or a run loads anything, every hub
repository its jobs read (models, tokenizers, MT models, datasets) is checked the way
huggingface_hub reaches it (``HF_ENDPOINT``, proxies, ``HF_TOKEN`` or the saved login):

* under ``HF_HUB_OFFLINE=1`` (compute nodes without internet), each must be in the hub cache;
* otherwise the hub must answer, and each repository must be readable with the token there is:
  a gated model (Llama 3.1, Gemma 2) needs its licence accepted on its page and a token.

A failure is one sentence naming what to do. The token is read by huggingface_hub from the
environment or its login file; nothing here writes it anywhere (SLURM jobs inherit it through
the environment of the submitting shell).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import DictConfig

from .data.tasks import offline
from .errors import ConfigError
from .methods import method_for


class AccessError(ConfigError):
    """A hub repository that a job reads cannot be read from here."""


@dataclass(frozen=True)
class Need:
    """A hub repository a job reads: ``repo``, its type and revision, and what it is for."""

    repo: str
    repo_type: str = "model"
    revision: str | None = None
    what: str = "model"

    @property
    def page(self) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo}"

    @property
    def download(self) -> str:
        kind = " --repo-type dataset" if self.repo_type == "dataset" else ""
        return f"huggingface-cli download {self.repo}{kind}" + (f" --revision {self.revision}" if self.revision else "")


def needs(cfg: DictConfig) -> list[Need]:
    """The hub repositories the job of ``cfg`` reads."""
    method, model, task, mt = method_for(cfg.method), cfg.model, cfg.task, cfg.mt
    found = []
    if model.source == "hub" and _on_hub(model.path):
        found.append(Need(model.path, what=f"model {model.name}"))
    tokenizer = model.get("tokenizer")
    if tokenizer and not str(tokenizer).startswith("package:") and _on_hub(tokenizer):
        found.append(Need(tokenizer, what=f"tokenizer of {model.name}"))
    if (method.trains or method.reads_english_test) and mt.get("model") and _on_hub(mt.model):
        found.append(Need(mt.model, what=f"MT model ({mt.name})"))
    if method.needs_mt_encoder and method.cfg.encoder != "tiny" and _on_hub(method.cfg.encoder):
        found.append(Need(method.cfg.encoder, what="FLARE MT's encoder"))
    if not task.local and not cfg.data.dir and not cfg.data.get("hub_mirror"):
        hub = task.source.hub
        found.append(Need(hub.path, "dataset", hub.get("revision"), what=f"{task.name} data"))
    return found


def _on_hub(path: str) -> bool:
    """Whether ``path`` names a hub repository (a local folder, as ``from_pretrained`` reads it
    first, does not)."""
    return not os.path.isdir(os.path.expanduser(str(path)))


def cached(need: Need) -> bool:
    """Whether ``need`` lies in the hub cache (a model with its config, a dataset with files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(need.repo, repo_type=need.repo_type, revision=need.revision,
                                   local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    files = [name for _, _, names in os.walk(folder) for name in names]
    return ("config.json" in files or "tokenizer_config.json" in files) if need.repo_type == "model" else bool(files)


def check(need: Need) -> None:
    """Refuse ``need`` where the hub does not answer or does not let this token read it."""
    from huggingface_hub import auth_check, constants, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        auth_check(need.repo, repo_type=need.repo_type)
    except GatedRepoError:
        if get_token() is None:
            raise AccessError(f"The {need.what} {need.repo} is gated: accept its licence at {need.page}, then "
                              "set HF_TOKEN (or run `huggingface-cli login`) where the jobs are submitted.") from None
        raise AccessError(f"The {need.what} {need.repo} is gated and this token has no access: accept its licence "
                          f"at {need.page} with the account of HF_TOKEN (or of `huggingface-cli login`).") from None
    except RepositoryNotFoundError:
        raise AccessError(f"The hub has no {need.what} {need.repo} readable with this token: check its name, "
                          "or set HF_TOKEN to a token that can read it.") from None
    except HfHubHTTPError as error:
        raise AccessError(f"The hub at {constants.ENDPOINT} answered {error.response.status_code} for the {need.what} "
                          f"{need.repo}: try again later, or check HF_ENDPOINT.") from None
    except Exception as error:  # the transport's own errors: refused, unresolvable, timed out, proxy
        if not _network_error(error):
            raise
        raise AccessError(f"The Hugging Face hub cannot be reached at {constants.ENDPOINT} ({type(error).__name__}): "
                          "check HF_ENDPOINT and the proxy settings (HTTPS_PROXY), or, where every model and "
                          "dataset is in the hub cache, set HF_HUB_OFFLINE=1.") from None


def _network_error(error: Exception) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "ProxyError", "NetworkError",
                         "ConnectionError", "OSError"})


def preflight(cfgs: list[DictConfig]) -> list[Need]:
    """Check every hub repository the jobs of ``cfgs`` read, each once; the repositories checked."""
    found = list(dict.fromkeys(n for cfg in cfgs for n in needs(cfg)))
    if offline():
        missing = [n for n in found if not cached(n)]
        if missing:
            first = missing[0]
            more = f" (and {len(missing) - 1} more: {', '.join(n.repo for n in missing[1:])})" if len(missing) > 1 else ""
            raise AccessError(f"HF_HUB_OFFLINE=1 and the {first.what} {first.repo} is not in the hub cache{more}: "
                              f"download it where the hub can be reached, with the same HF_HOME: `{first.download}` "
                              "(or run the offline demo, which needs no download: `python run.py experiment=demo`).")
        return found
    for need in found:
        check(need)
    return found
