"""The versions of one served model, and which one a chunk runs on (invariant 14, docs/invariants.md).

A stream's record carries the fingerprint of the model version that wrote it (server/state/record.py), so a
sequence stays on the version that started it: its chunks run there while that version is loaded, whatever
is newest. A new sequence starts on the newest READY version, or the one its first chunk names. A version
leaves service in two steps: DRAINING (out of the policy, removed from the repository, or unloaded on
request: it serves the sequences pinned to it, never a new one), then dropped, when the sequences pinned to
it get `--on-retired-version` (server/dataplane/rules.py). What loads and retires versions is
server/app/models.py; this module only keeps the table the data path reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server import metrics
from server.state.record import fingerprint_bytes
from server.types import ModelDescription, Runner

READY = "READY"
DRAINING = "DRAINING"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
# A fingerprint whose version the registry could not be asked about (Redis did not answer).
UNRESOLVED = -1


@dataclass(slots=True)
class ServingVersion:
    """One loaded version: its runner, the fingerprint its records carry, and where it stands."""

    number: int
    runner: Runner
    state: str = READY
    reason: str = ""  # why DRAINING
    # time.monotonic() of the last chunk that ran on it, and when it was retired (DRAINING since).
    last_used: float = field(default_factory=time.monotonic)
    retired_at: float = 0.0
    # Unloaded on request: dropped --version-drain-s after retirement, however much it is used.
    unload_requested: bool = False
    fingerprint: bytes = b""
    zero_state: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint_bytes(self.runner.description.fingerprint)
        self.zero_state = self.runner.zero_states(1)[0]

    @property
    def description(self) -> ModelDescription:
        return self.runner.description


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """A row of ListModels / RepositoryIndex."""

    model: str
    number: int
    state: str
    reason: str = ""
    fingerprint: str = ""


class ModelControl(Protocol):
    """Loading and unloading versions on request (server/app/models.py): what the repository RPCs call."""

    async def load(self, model: str) -> None:
        """Read the model's folder again and load what its policy serves; raises ServiceError (NOT_FOUND,
        INVALID_ARGUMENT with the reason no version could be loaded)."""
        ...

    async def unload(self, model: str, version: int = 0) -> None:
        """Retire one version (0: every version) of the model: it drains, then is dropped."""
        ...

    async def locate(self, versions: ModelVersions, fingerprints: set[bytes], deadline: float) -> None:
        """Find out which versions wrote these fingerprints (ones this process never loaded), noting each in
        `versions`: located (a load for its sequences starts), gone, or unknown (another model's)."""
        ...

    def status(self) -> list[VersionStatus]:
        """Versions of models with no version serving (why they failed), beside the data plane's own."""
        ...


class ModelVersions:
    """The version table of one model: what the stream rules and the processor look up per chunk."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._serving: dict[int, ServingVersion] = {}
        self._by_fingerprint: dict[bytes, ServingVersion] = {}
        # Versions this process served and dropped, by fingerprint: a chunk pinned to one is told which.
        self._dropped: dict[bytes, int] = {}
        # Versions not serving, with why (LOADING, or UNAVAILABLE: failed to load, dropped).
        self._other: dict[int, VersionStatus] = {}
        # Fingerprints this process never loaded, as the shared registry placed them (server/state/registry.py):
        # the version that wrote them (being loaded for their sequences), or 0 (not a version of this model), and
        # until when (time.monotonic()) that answer stands before it is asked again.
        self._located: dict[bytes, tuple[int, float]] = {}
        self._newest: ServingVersion | None = None

    @classmethod
    def of(cls, runner: Runner, number: int = 1, name: str = "") -> ModelVersions:
        """One model of one version (`lstm-serve --model FILE` serves its model as version 1)."""
        versions = cls(name or runner.description.name)
        versions.add(ServingVersion(number, runner))
        return versions

    # What the data path asks, per chunk.

    def newest(self) -> ServingVersion | None:
        """The newest READY version: where new sequences start."""
        return self._newest

    def get(self, number: int) -> ServingVersion | None:
        """A version that serves (READY or DRAINING)."""
        return self._serving.get(number)

    def by_fingerprint(self, fingerprint: bytes) -> ServingVersion | None:
        return self._by_fingerprint.get(fingerprint)

    def number_of(self, fingerprint: bytes) -> int:
        """The version that wrote a record with this fingerprint (0: none this process knows)."""
        version = self._by_fingerprint.get(fingerprint)
        return version.number if version is not None else self._dropped.get(fingerprint, 0)

    def dropped_number(self, fingerprint: bytes) -> int:
        return self._dropped.get(fingerprint, 0)

    def needs_locating(self, fingerprint: bytes) -> bool:
        """A fingerprint of no version this process knows, nor looked up lately."""
        if fingerprint in self._by_fingerprint or fingerprint in self._dropped:
            return False
        located = self._located.get(fingerprint)
        return located is None or located[1] <= time.monotonic()

    def loading_number(self, fingerprint: bytes) -> int:
        """The version being loaded for sequences with this fingerprint (0: none)."""
        located = self._located.get(fingerprint)
        if located is None or located[0] <= 0 or fingerprint in self._by_fingerprint:
            return 0
        row = self._other.get(located[0])
        return located[0] if row is not None and row.state == LOADING else 0

    def note_located(self, fingerprint: bytes, number: int, valid_s: float) -> None:
        self._located[fingerprint] = (number, time.monotonic() + valid_s)

    def note_unresolved(self, fingerprint: bytes) -> None:
        """The registry could not be read: the fingerprint's chunks wait (UNAVAILABLE), and it is asked again on
        their next try, rather than taken for another model's."""
        self._located[fingerprint] = (UNRESOLVED, time.monotonic())

    def unresolved(self, fingerprint: bytes) -> bool:
        located = self._located.get(fingerprint)
        return located is not None and located[0] == UNRESOLVED

    def note_gone(self, fingerprint: bytes, number: int) -> None:
        """A version of this model this process never served, and will not: its sequences get the retired policy."""
        self._dropped[fingerprint] = number

    def serving(self) -> list[ServingVersion]:
        return sorted(self._serving.values(), key=lambda v: v.number)

    def ready_numbers(self) -> list[int]:
        return [v.number for v in self.serving() if v.state == READY]

    def status(self) -> list[VersionStatus]:
        rows = [VersionStatus(self.name, v.number, v.state, v.reason, v.description.fingerprint)
                for v in self._serving.values()]
        rows += [row for number, row in self._other.items() if number not in self._serving]
        return sorted(rows, key=lambda row: row.number)

    # What the loader changes (server/app/models.py), on the event loop.

    def add(self, version: ServingVersion) -> None:
        self._other.pop(version.number, None)
        self._serving[version.number] = version
        self._by_fingerprint[version.fingerprint] = version
        self._dropped.pop(version.fingerprint, None)
        self._refresh()

    def mark(self, number: int, state: str, reason: str = "") -> None:
        """A version that does not serve: LOADING, or UNAVAILABLE with the reason (a failed load)."""
        if number not in self._serving:
            self._other[number] = VersionStatus(self.name, number, state, reason)
            self._refresh()

    def forget(self, number: int) -> None:
        self._other.pop(number, None)
        self._refresh()

    def retire(self, number: int, reason: str, *, unload_requested: bool = False) -> None:
        version = self._serving.get(number)
        if version is None or (version.state == DRAINING and not unload_requested):
            return
        version.state, version.reason = DRAINING, reason
        version.retired_at = time.monotonic()
        version.unload_requested = version.unload_requested or unload_requested
        self._refresh()

    def restore(self, number: int) -> None:
        """A draining version back in the policy (it became one of the newest again, or was loaded on request)."""
        version = self._serving.get(number)
        if version is not None and version.state == DRAINING:
            version.state, version.reason, version.unload_requested = READY, "", False
            self._refresh()

    def drop(self, number: int, reason: str) -> ServingVersion | None:
        version = self._serving.pop(number, None)
        if version is None:
            return None
        # Two versions may hold the same model (a file copied under a new number): sequences with its fingerprint
        # stay on the one still serving.
        twin = next((v for v in self._serving.values() if v.fingerprint == version.fingerprint), None)
        if twin is not None:
            self._by_fingerprint[version.fingerprint] = twin
        else:
            self._by_fingerprint.pop(version.fingerprint, None)
            self._dropped[version.fingerprint] = number
        self._other[number] = VersionStatus(self.name, number, UNAVAILABLE, reason)
        self._refresh()
        return version

    def _refresh(self) -> None:
        ready = [v for v in self._serving.values() if v.state == READY]
        self._newest = max(ready, key=lambda v: v.number) if ready else None
        counts = {READY: 0, DRAINING: 0, LOADING: 0, UNAVAILABLE: 0}
        for row in self.status():
            counts[row.state] += 1
        for state, count in counts.items():
            metrics.MODEL_VERSIONS.labels(self.name, state).set(count)
