"""The server's release version: the one in pyproject.toml, read from where the running code came from.

One source of truth, the `version` of pyproject.toml. Read in this order:

1. The pyproject.toml beside this package, when it names this distribution: the code runs from a source
   tree (a checkout, installed editable or not at all). The tree's file is the code's version; an
   editable install's metadata is frozen at install time and goes stale at the next bump, and a tree
   run with PYTHONPATH (a previous release's tag, as the upgrade test runs one) is not the installed one.
2. Else the installed distribution's metadata (a wheel: the container image, `pip install .`), which
   has no pyproject.toml beside the package.

Plain Python, no gRPC and no TensorFlow: `lstm-serve --version` and the servicers read it.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from functools import cache
from pathlib import Path

DISTRIBUTION = "lstm-stream-server"
UNKNOWN = "0+unknown"
_SOURCE_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def server_version() -> str:
    try:
        project = tomllib.loads(_SOURCE_PYPROJECT.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        project = {}
    if project.get("name") == DISTRIBUTION and isinstance(project.get("version"), str):
        return project["version"]
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN
