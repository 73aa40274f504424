"""A non-editable install (pip install ., the container image) ships the default model and finds it.

Before the model was package data, the installed server looked for site-packages/models/default.keras
and refused to start; lstm-loadtest --verify failed the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from devkit import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# The generated code and the client are the lstm-stream-client distribution (clients/python), a
# dependency the server's wheel does not carry.
SOURCES = ("pyproject.toml", "README.md", "server", "loadtest", "sensorsim", "models")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy, so setuptools' build/ and egg-info never land in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=150)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's dependency lstm-stream-client (clients/python), built the same way."""
    source = tmp_path_factory.mktemp("client-source") / "python"
    shutil.copytree(ROOT / "clients" / "python", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("client-wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=150)
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_carries_the_default_model_as_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "server/model/default.keras" in names, sorted(n for n in names if "model" in n)
        assert "server/model/default.json" in names
        shipped = hashlib.sha256(archive.read("server/model/default.keras")).hexdigest()
    assert shipped == digest(ROOT / "models" / "default.keras")  # the file itself, not a link to it


def test_an_installed_server_and_loadtest_find_the_model(wheel: Path, client_wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel), str(client_wheel)], check=True, timeout=120)
    probe = (
        "import server.config as s, loadtest.config as l, pathlib\n"
        "print(s.ServerConfig().model)\nprint(l.DEFAULT_MODEL)\n"
    )
    # Run from elsewhere with only the installed copy on the path: the checkout must not be found.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    server_model, loadtest_model = (Path(line) for line in result.stdout.split())
    assert server_model.is_relative_to(target), server_model
    assert server_model.is_file() and not server_model.is_symlink()
    assert digest(server_model) == digest(ROOT / "models" / "default.keras")
    assert loadtest_model == server_model
