"""server/version.py: where the release version is read from (the source tree's pyproject.toml first,
the installed distribution's metadata else, "0+unknown" when neither names it)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import version


@pytest.fixture
def fresh_version() -> Iterator[None]:
    version.server_version.cache_clear()
    yield
    version.server_version.cache_clear()


def test_a_source_tree_reads_its_own_pyproject(fresh_version, tmp_path: Path, monkeypatch) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "lstm-stream-server"\nversion = "9.8.7"\n')
    monkeypatch.setattr(version, "_SOURCE_PYPROJECT", pyproject)
    assert version.server_version() == "9.8.7"


@pytest.mark.parametrize("content", [None, "not toml [", '[project]\nname = "another-project"\nversion = "1"\n'])
def test_without_the_trees_pyproject_the_installed_metadata_answers(fresh_version, tmp_path: Path, monkeypatch,
                                                                      content: str | None) -> None:
    # A wheel has no pyproject.toml beside the package; a broken or foreign one is not the release's either.
    pyproject = tmp_path / "pyproject.toml"
    if content is not None:
        pyproject.write_text(content)
    monkeypatch.setattr(version, "_SOURCE_PYPROJECT", pyproject)
    assert version.server_version() == importlib.metadata.version(version.DISTRIBUTION)


def test_neither_gives_unknown(fresh_version, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(version, "_SOURCE_PYPROJECT", tmp_path / "missing.toml")
    monkeypatch.setattr(version, "DISTRIBUTION", "no-such-distribution-here")
    assert version.server_version() == version.UNKNOWN
