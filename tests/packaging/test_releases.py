"""Where the rolling-upgrade test finds the previous release (devkit/releases.py).

CI checks out main alone, without tags: the release must still be found, by the commit RELEASES records
(the earlier CI run failed with "the tag v0.1.0 is missing" exactly there). A shallow clone without the
commit is told apart (skip, with the command that fetches it), and a tag that moved is refused.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from devkit import ROOT
from devkit.releases import PREVIOUS_RELEASE, RELEASES, ReleaseMissing, materialise, release_commit

pytestmark = pytest.mark.timeout(120)


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=True).stdout


def test_a_clone_of_main_without_tags_finds_the_release_by_its_commit(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    git("clone", "--quiet", "--no-tags", "--single-branch", str(ROOT), str(clone))
    assert git("tag", "--list", cwd=clone).strip() == ""
    assert release_commit(PREVIOUS_RELEASE, clone) == RELEASES[PREVIOUS_RELEASE]
    tree = materialise(PREVIOUS_RELEASE, tmp_path / "releases", clone)
    assert (tree / "server" / "__main__.py").is_file()
    assert not (tree / "server" / "version.py").exists()  # 0.1.0 had no version module: its tree, not HEAD's


def test_a_shallow_clone_without_the_commit_is_told_apart(tmp_path: Path) -> None:
    clone = tmp_path / "shallow"
    git("clone", "--quiet", "--no-tags", "--depth", "1", f"file://{ROOT}", str(clone))
    if git("rev-parse", "HEAD", cwd=clone).strip() == RELEASES[PREVIOUS_RELEASE]:
        pytest.skip("this checkout is the release itself")
    with pytest.raises(ReleaseMissing, match="shallow"):
        release_commit(PREVIOUS_RELEASE, clone)


def test_a_tag_that_names_another_commit_is_refused(tmp_path: Path) -> None:
    clone = tmp_path / "moved"
    git("clone", "--quiet", "--no-tags", "--single-branch", str(ROOT), str(clone))
    git("tag", "--force", PREVIOUS_RELEASE, "HEAD", cwd=clone)
    with pytest.raises(RuntimeError, match="records"):
        release_commit(PREVIOUS_RELEASE, clone)
