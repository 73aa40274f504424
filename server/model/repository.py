"""A model repository on disk, in the layout Triton and TF Serving use, and which of its versions to serve.

    DIR/<model>/<version>/model.keras    a version: a positive integer folder holding one model file
    DIR/<model>/version_policy           optional: this model's policy (one line, as --version-policy)

Reading the folder is all this module does (docs/models.md): loading and serving the versions it finds is
server/app/models.py's job. A version's files are described by their sizes and modification times, so the
caller can load a version only once they stop changing (a version being copied in place is never loaded
half-written) and load it again when they change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Model names travel in Redis keys (server/state/keys.py) and in Triton's URLs: the characters of tenant names.
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The files a version folder may hold, in the order they are looked for (the formats keras.models.load_model reads).
MODEL_FILES = ("model.keras", "model.h5")
POLICY_FILE = "version_policy"
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


class PolicyError(ValueError):
    """A version policy that cannot be read; the message says what is expected."""


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions take new sequences: the `count` newest (latest), every one (all), or the listed ones."""

    kind: str
    count: int = 1
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        spec = text.strip()
        if spec == "all":
            return cls("all")
        kind, _, argument = spec.partition(":")
        try:
            if kind == "latest":
                count = int(argument)
                if count >= 1:
                    return cls("latest", count=count)
            elif kind == "specific":
                versions = frozenset(int(part) for part in argument.split(","))
                if versions and min(versions) >= 1:
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise PolicyError(f"{text!r} is not a version policy: expected latest:N (N >= 1), all, or specific:1,3")

    def select(self, available: Iterable[int]) -> set[int]:
        versions = sorted(available)
        if self.kind == "all":
            return set(versions)
        if self.kind == "latest":
            return set(versions[-self.count:])
        return {v for v in versions if v in self.versions}

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in sorted(self.versions))
        return "all"


@dataclass(frozen=True, slots=True)
class VersionFiles:
    """One version folder: its model file, and what its files looked like when read (size and mtime of each)."""

    model: str
    version: int
    path: Path
    signature: tuple[tuple[str, int, int], ...]


@dataclass(slots=True)
class ModelFolder:
    """One model's folder: the versions found, its own policy if it has one, and what could not be read."""

    name: str
    versions: dict[int, VersionFiles] = field(default_factory=dict)
    policy: VersionPolicy | None = None
    problems: list[str] = field(default_factory=list)


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    entries = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                info = os.stat(path)
            except OSError:
                continue  # removed while listed: the next read sees the folder settled or gone
            entries.append((os.path.relpath(path, folder), info.st_size, info.st_mtime_ns))
    return tuple(sorted(entries))


def scan(root: str | Path) -> dict[str, ModelFolder]:
    """Every model folder under `root` and its versions. Entries that are not a model or a version (other names,
    files) are listed as problems of their model, or skipped when they are not a model name at all."""
    base = Path(root)
    models: dict[str, ModelFolder] = {}
    for entry in sorted(base.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not MODEL_NAME.fullmatch(entry.name):
            continue  # not a model: a model name is 1-64 of [A-Za-z0-9_.-]
        folder = ModelFolder(entry.name)
        models[entry.name] = folder
        policy_file = entry / POLICY_FILE
        if policy_file.is_file():
            try:
                folder.policy = VersionPolicy.parse(policy_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, PolicyError) as exc:
                folder.problems.append(f"{policy_file}: {exc}")
        for version_dir in sorted(entry.iterdir()):
            if not version_dir.is_dir() or version_dir.name.startswith("."):
                continue
            if not _VERSION.fullmatch(version_dir.name):
                folder.problems.append(f"{version_dir}: a version folder's name is a positive integer")
                continue
            model_file = next((version_dir / n for n in MODEL_FILES if (version_dir / n).is_file()), None)
            if model_file is None:
                folder.problems.append(f"{version_dir}: no model file ({' or '.join(MODEL_FILES)})")
                continue
            folder.versions[int(version_dir.name)] = VersionFiles(
                entry.name, int(version_dir.name), model_file, _signature(version_dir))
    return models
