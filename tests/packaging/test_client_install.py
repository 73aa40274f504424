"""The client distribution (clients/python) installs and works in a fresh virtual environment that has
no TensorFlow and no Keras, without any network access.

The fresh venv gets exactly grpcio, protobuf and numpy (the client's three dependencies), plus pip and
setuptools to build it, through a .pth file pointing at a folder of symlinks into the test runner's
site-packages; nothing is downloaded. `pip install --no-index --no-deps --no-build-isolation` then
builds and installs the client from a copy of clients/python. In that venv `import tensorflow` and
`import keras` fail, and the installed client and its `lstm-stream` command stream to a real server
and get Keras' answer.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from devkit import ROOT
from devkit.references import TOLERANCE, keras_whole_sequence
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow

# The client's dependencies (and, through them, theirs), and what pip needs to build it.
DEPENDENCIES = ("grpcio", "protobuf", "numpy")
BUILD_TOOLS = ("pip", "setuptools")


def closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The distributions `names` need, from this interpreter's metadata (extras left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        todo += [re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0] for req in dist.requires or () if "extra ==" not in req]
    return list(found.values())


def provide_packages(target: Path) -> list[str]:
    """Symlinks to just those distributions' files in this interpreter's site-packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    names = []
    for dist in closure(DEPENDENCIES + BUILD_TOOLS):
        names.append(dist.metadata["Name"])
        for file in dist.files or ():
            parts = Path(file).parts
            if not parts or parts[0] == "..":
                continue  # scripts outside site-packages
            # A namespace package (google.*) is shared: link only this distribution's part of it.
            top = parts[:2] if parts[0] == "google" and len(parts) > 2 else parts[:1]
            link = target.joinpath(*top)
            if not link.exists() and (site.joinpath(*top)).exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(site.joinpath(*top))
    return names


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, **kwargs)


@pytest.mark.timeout(300)
def test_client_installs_without_tensorflow_and_streams(default_server, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    deps = tmp_path / "deps"
    provided = provide_packages(deps)
    assert not {"tensorflow", "keras", "tensorflow-cpu"} & {name.lower() for name in provided}, provided
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         tmp_path).stdout.strip())
    (venv_site / "provided-deps.pth").write_text(f"{deps}\n")

    probe = run([str(python), "-c", "import setuptools; print(setuptools.__version__)"], tmp_path)
    assert probe.returncode == 0, f"setuptools is not available in the fresh venv: {probe.stderr}"
    assert int(probe.stdout.split(".")[0]) >= 77, f"the client's build needs setuptools>=77, got {probe.stdout}"

    source = tmp_path / "client-src"  # a copy: building writes egg-info next to the sources
    shutil.copytree(ROOT / "clients" / "python", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                                       "build"))
    installed = run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                     str(source)], tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    for module in ("tensorflow", "keras"):
        result = run([str(python), "-c", f"import {module}"], tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, f"{module} is importable"

    x = np.random.default_rng(5).normal(size=(40, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, lstm_stream, lstm_stream.client
        from lstm_stream.client import Client
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        x = np.load("x.npy")
        with Client("{default_server.address}") as client:
            stream = client.stream("install-{uuid.uuid4().hex[:6]}")
            out = np.concatenate([stream.send(x[:15]), *stream.pipe([x[15:30], x[30:]])])
        print(json.dumps({{"where": lstm_stream.client.__file__, "outputs": out.ravel().tolist()}}))
    """)
    result = run([str(python), "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["where"].startswith(str(venv)), f"imported from {answer['where']}, not the fresh venv"
    got = np.asarray(answer["outputs"], dtype=np.float32).reshape(-1, 1)
    assert float(np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x)))) <= TOLERANCE

    cli = run([str(venv / "bin" / "lstm-stream"), "--target", default_server.address, "model"], tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["input_features"] == 1
