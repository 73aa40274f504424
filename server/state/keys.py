"""The one layout of this server's Redis keys (invariant 13, docs/invariants.md).

    <prefix>:{<stream_id>}            a stream's slot, on a server without API keys
    <prefix>:<tenant>:{<stream_id>}   a stream's slot, with API keys: each tenant its own namespace
    <prefix>:<tenant>:live            a limited tenant's live streams (server/state/live.py)

A tenant name is 1-64 of [A-Za-z0-9_.-], never a brace, so no tenant's slot key can equal another
tenant's or a key without tenant; a live set has no braces, so it never equals a slot key. The braces
are a Redis Cluster hash tag, so everything kept for one stream lands on one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str

    def slot(self, stream_id: str, tenant: str = "") -> str:
        if tenant:
            return f"{self.prefix}:{tenant}:{{{stream_id}}}"
        return f"{self.prefix}:{{{stream_id}}}"

    def live(self, tenant: str) -> str:
        return f"{self.prefix}:{tenant}:live"
