"""An earlier release of this repository, from its git tag, as a source tree a server can run from.

`materialise("v0.1.0", folder)` writes the tag's tree (`git archive TAG | tar -x`) into folder/TAG;
`release_env(tree)` is the environment that makes `python -m server` (cwd = tree) import that tree's
`server` and `lstm_stream` packages instead of this checkout's. The virtual environment's third-party
packages are shared: the releases pin the same ones. The editable installs of this checkout come after
PYTHONPATH on sys.path (setuptools appends their finders to sys.meta_path), so the tree wins.

Used by the rolling-upgrade test (tests/topologies/test_rolling_upgrade.py) through
devkit/topology.py's `Topology.start_replica(index, source=tree)`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devkit import ROOT

PREVIOUS_RELEASE = "v0.1.0"


class ReleaseMissing(RuntimeError):
    """The tag is not in this clone, and the clone is shallow: it has no history to hold it."""


def tag_available(tag: str) -> bool:
    """Whether `tag` names a commit here; raises ReleaseMissing when it does not in a shallow clone (a CI
    checkout without history), where its absence says nothing about the repository."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
                           capture_output=True, timeout=30).returncode == 0
    if not found:
        shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
                                 capture_output=True, text=True, timeout=30).stdout.strip() == "true"
        if shallow:
            raise ReleaseMissing(f"{tag} is not in this shallow clone: fetch it (git fetch --tags --unshallow)")
    return found


def materialise(tag: str, folder: Path) -> Path:
    """The tree of `tag`, written under folder/tag (once; an existing one is reused). Its path."""
    tree = folder / tag
    if (tree / "server" / "__main__.py").exists():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", tag], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    try:
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True, timeout=120)
    finally:
        archive.stdout.close()
        code = archive.wait(120)
    if code != 0:
        raise RuntimeError(f"git archive {tag} exited with {code}: is the tag in this repository?")
    return tree


def release_env(tree: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (os.environ by default) with PYTHONPATH naming the tree and its client distribution first."""
    env = dict(os.environ if base is None else base)
    paths = [str(tree), str(tree / "clients" / "python")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def server_command(*args: str) -> list[str]:
    """`lstm-serve ARGS` as this Python runs it from a source tree (cwd must be the tree)."""
    return [sys.executable, "-m", "server", *args]


def imported_server_package(tree: Path) -> Path:
    """Where `import server` resolves with release_env(tree) and cwd = tree: the check that a replica
    started that way runs the release's code, not this checkout's."""
    done = subprocess.run([sys.executable, "-c", "import server, sys; sys.stdout.write(server.__file__)"],
                          cwd=tree, env=release_env(tree), capture_output=True, text=True, timeout=60, check=True)
    return Path(done.stdout).resolve().parent
