"""The access preflight on the submitting node, each case in a fresh process (huggingface_hub reads
its settings from the environment at import): offline with a filled cache, offline with a
missing model, a gated model without a token or without granted access, an unreachable hub; the
hub of these tests is a stub on the loopback address."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from helpers import ROOT

GATED = "meta-llama/Llama-3.1-8B"
CODE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import make_cfg
from flare_exp.access import preflight
from flare_exp.errors import ConfigError
try:
    checked = preflight([make_cfg(["method=flare", "lang=sw", "data.dir=/nonexistent"])])
    print("ok", " ".join(n.repo for n in checked))
except ConfigError as error:
    print("refused", error)
"""


def _preflight(env: dict) -> str:
    base = {"PATH": "/usr/bin:/bin", "HF_HOME": env.pop("HF_HOME"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-c", CODE.format(tests=str(ROOT / "tests"))], capture_output=True,
                          text=True, env={**base, **env}, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _cache_model(hub_cache: Path, repo: str, files=("config.json",)) -> None:
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


def test_offline_with_a_filled_cache_is_accepted(tmp_path):
    for repo in (GATED, "facebook/nllb-200-3.3B"):
        _cache_model(tmp_path / "hub", repo)
    line = _preflight({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert line == f"ok {GATED} facebook/nllb-200-3.3B"  # data.dir: no hub dataset


def test_offline_without_the_model_names_the_download_command(tmp_path):
    _cache_model(tmp_path / "hub", "facebook/nllb-200-3.3B")
    line = _preflight({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert line.startswith(f"refused HF_HUB_OFFLINE=1 and the model llama3.1-8b {GATED} is not in the hub cache")
    assert f"`huggingface-cli download {GATED}`" in line


def test_models_in_local_folders_need_no_hub_cache(tmp_path):
    """``model.path=/scratch/llama`` (and a local tokenizer, MT model) is read by from_pretrained
    as a folder, not a hub repository: offline it needs nothing in the cache."""
    from flare_exp.access import needs

    from helpers import make_cfg

    folders = {name: tmp_path / name for name in ("llama", "tokenizer", "nllb")}
    for folder in folders.values():
        folder.mkdir()
    cfg = make_cfg(["method=flare", "lang=sw", "data.dir=/nonexistent", f"model.path={folders['llama']}",
                    f"++model.tokenizer={folders['tokenizer']}", f"mt.model={folders['nllb']}"])
    assert needs(cfg) == []
    assert [n.repo for n in needs(make_cfg(["method=flare", "lang=sw", "data.dir=/nonexistent"]))] == [
        GATED, "facebook/nllb-200-3.3B"]


class _Hub(BaseHTTPRequestHandler):
    """/api/models/<repo>/auth-check: the gated model answers 401 without a token and 403 with one."""

    def do_GET(self):  # noqa: N802
        gated = self.path == f"/api/models/{GATED}/auth-check"
        status = (403 if self.headers.get("Authorization") else 401) if gated else 200
        self.send_response(status)
        if gated:
            self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "gated"} if gated else {}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_gated_model_without_a_token_names_its_licence_page_and_hf_token(tmp_path, hub):
    line = _preflight({"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub})
    assert line == (f"refused The model llama3.1-8b {GATED} is gated: accept its licence at {hub}/{GATED}, then set "
                    "HF_TOKEN (or run `huggingface-cli login`) where the jobs are submitted.")


def test_a_gated_model_whose_licence_the_token_lacks_is_refused_without_the_token(tmp_path, hub):
    token = "hf_" + "x" * 34
    line = _preflight({"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub, "HF_TOKEN": token})
    assert "is gated and this token has no access: accept its licence at" in line and token not in line


def test_an_unreachable_hub_is_one_sentence_naming_the_endpoint(tmp_path):
    with socket_closed() as endpoint:
        line = _preflight({"HF_HOME": str(tmp_path), "HF_ENDPOINT": endpoint})
    assert line.startswith(f"refused The Hugging Face hub cannot be reached at {endpoint} (")
    assert "HF_HUB_OFFLINE=1" in line


class socket_closed:
    """An endpoint on the loopback address where nothing listens."""

    def __enter__(self):
        import socket

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        return False


def test_a_sweep_is_refused_before_it_submits_anything(tmp_path, capsys):
    from flare_exp import sweep
    from flare_exp.report.experiments import command

    status = command(lambda: sweep.main([  # under the tests' HF_HUB_OFFLINE=1, with an empty hub cache
        "experiment=paper_nusax", "hydra.sweeper.params.lang=ace", "hydra.sweeper.params.model=xlmr-large",
        "hydra.sweeper.params.method=lora", f"output_dir={tmp_path}", "--launcher", "slurm"]))
    assert status == 2 and "is not in the hub cache" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no chain folder, no sweep, no job
