"""An earlier release of this repository, from its commit, as a source tree a server can run from.

RELEASES records each release's commit beside its tag: a clone of the main branch alone (CI's) carries
no tags, but main's history holds every release commit. `release_commit(tag)` resolves one (the tag must
agree with the record where the clone has it); `materialise("v0.1.0", folder)` writes its tree
(`git archive COMMIT | tar -x`) into folder/TAG;
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

# Each release's tag and the commit it names on main (CHANGELOG.md); a new release adds its line here.
RELEASES = {"v0.1.0": "fd9eacd35a978fae3c158b8a148a99a5037fb006"}
PREVIOUS_RELEASE = "v0.1.0"


class ReleaseMissing(RuntimeError):
    """The release's commit is not in this clone, and the clone is shallow: it has no history to hold it."""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)


def _commit_of(repo: Path, name: str) -> str | None:
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    return found.stdout.strip() if found.returncode == 0 else None


def release_commit(tag: str, repo: Path = ROOT) -> str:
    """The commit of release `tag` in `repo`. Raises ReleaseMissing in a shallow clone that lacks it (its
    absence there says nothing about the repository), and RuntimeError where a full clone lacks it or the
    tag names another commit than RELEASES records (a moved tag: the test would run something else)."""
    recorded = RELEASES[tag]
    tagged = _commit_of(repo, tag)
    if tagged is not None and tagged != recorded:
        raise RuntimeError(f"the tag {tag} names {tagged}, but devkit/releases.py records {recorded}")
    if _commit_of(repo, recorded) is not None:
        return recorded
    if _git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        raise ReleaseMissing(f"{tag} ({recorded[:12]}) is not in this shallow clone: git fetch --unshallow")
    raise RuntimeError(f"{tag}'s commit {recorded} is not in {repo}, a full clone: is it a clone of this project?")


def materialise(tag: str, folder: Path, repo: Path = ROOT) -> Path:
    """The tree of release `tag`, written under folder/tag (once; an existing one is reused). Its path."""
    tree = folder / tag
    if (tree / "server" / "__main__.py").exists():
        return tree
    commit = release_commit(tag, repo)
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    try:
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True, timeout=120)
    finally:
        archive.stdout.close()
        code = archive.wait(120)
    if code != 0:
        raise RuntimeError(f"git archive {commit} ({tag}) exited with {code}")
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
