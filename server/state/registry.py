"""Which model version wrote a fingerprint, shared by every replica (docs/models.md, "Rolling out a version").

A stream's record names the version that wrote it only by its fingerprint (server/state/record.py). A replica
that loaded another set of versions (it started after a newer one arrived, or its policy keeps fewer) meets
fingerprints it never loaded; this hash per model, `<prefix>:@<model>:versions` (keys.py), tells it which
repository version they belong to, so it can load that version for the sequences pinned to it. Every replica
adds the versions it loads; entries are never removed (a few bytes per version ever served).
"""

from __future__ import annotations

from collections.abc import Iterable

from server.state.connection import AsyncClient
from server.state.keys import KeyLayout


class VersionRegistry:
    def __init__(self, client: AsyncClient, key_prefix: str) -> None:
        self._client = client
        self._keys = KeyLayout(key_prefix)

    async def record(self, model: str, fingerprint: bytes, version: int) -> None:
        await self._client.hset(self._keys.versions(model), fingerprint.hex(), str(version))

    async def lookup(self, model: str, fingerprints: Iterable[bytes]) -> dict[bytes, int]:
        """The version of each fingerprint the registry knows (unknown ones are left out)."""
        wanted = list(fingerprints)
        found = await self._client.hmget(self._keys.versions(model), [f.hex() for f in wanted])
        return {fingerprint: int(value) for fingerprint, value in zip(wanted, found, strict=True) if value}
