"""Releases are versioned (issue 29): one version, pyproject.toml's, everywhere a replica says which it is.

`lstm-serve --version` prints it and the slot record formats the release reads and writes, without a
model or Redis; GetModel's `server_version`, `lstm-stream model` and Triton's ServerMetadata carry the
same; the client distribution is released with the same number, and the server requires exactly it.

This process imports tritonclient's generated `inference.*` messages, so it never imports the server's
own `lstm_stream.triton` (the same message names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import tritonclient.grpc as triton

from devkit import ROOT
from devkit.processes import free_port
from lstm_stream.v1 import stream_pb2 as pb
from server.state.record import NEWEST_FORMAT, PREVIOUS_RELEASE_FORMAT, READ_FORMATS

pytestmark = pytest.mark.timeout(120)

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CLIENT_PROJECT = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]


def test_server_and_client_are_one_release() -> None:
    assert CLIENT_PROJECT["version"] == VERSION
    assert f"{CLIENT_PROJECT['name']}=={VERSION}" in PROJECT["dependencies"]


def test_version_prints_the_release_and_record_formats_without_a_model_or_redis(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "LSTM_SERVE_MODEL": str(tmp_path / "missing.keras"),
           "LSTM_SERVE_REDIS_URL": f"redis://127.0.0.1:{port}/0"}  # nothing there; autostart would start one
    done = subprocess.run([sys.executable, "-m", "server", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"lstm-serve {VERSION}"
    assert f"reads {', '.join(map(str, READ_FORMATS))};" in lines[1]
    assert f"writes {PREVIOUS_RELEASE_FORMAT} to {NEWEST_FORMAT}" in lines[1]
    assert done.stderr == ""  # no log line: no model loaded, no Redis looked for or started
    assert not (tmp_path / ".lstm-serve").exists()


def test_get_model_and_the_client_cli_carry_the_server_version(default_server) -> None:
    assert default_server.stub.GetModel(pb.GetModelRequest(), timeout=10).server_version == VERSION
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}"}
    done = subprocess.run([sys.executable, "-m", "lstm_stream.client.cli", "--target", default_server.address, "model"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server_version"] == VERSION


def test_triton_server_metadata_version_is_the_release(default_server) -> None:
    with triton.InferenceServerClient(url=default_server.address) as client:
        assert client.get_server_metadata().version == VERSION
