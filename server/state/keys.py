"""The one layout of this server's Redis keys (invariant 13, docs/invariants.md).

    <prefix>:{<stream_id>}                    a stream's slot, on a server without API keys
    <prefix>:<tenant>:{<stream_id>}           a stream's slot, with API keys: each tenant its own namespace
    <prefix>:@<model>:{<stream_id>}           a stream of a repository's model (docs/models.md): each model
    <prefix>:<tenant>:@<model>:{<stream_id>}  its own namespace, as Triton's sequences are per model
    <prefix>:<tenant>:live                    a limited tenant's live streams (server/state/live.py)
    <prefix>:@<model>:versions                a repository model's versions by fingerprint (registry.py)

A tenant name is 1-64 of [A-Za-z0-9_.-], never a brace or "@", so no tenant's slot key can equal another
tenant's, a model's, or a key without tenant; a model name has the same characters, so an "@" marks it. The
model of `--model FILE` keeps the keys without a model. A live set has no braces, so it never equals a slot
key. The braces are a Redis Cluster hash tag, so everything kept for one stream lands on one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str
    model: str = ""  # the model's namespace ("" for the model of --model FILE)

    def slot(self, stream_id: str, tenant: str = "") -> str:
        model = f"@{self.model}:" if self.model else ""
        if tenant:
            return f"{self.prefix}:{tenant}:{model}{{{stream_id}}}"
        return f"{self.prefix}:{model}{{{stream_id}}}"

    def namespaced(self, model: str) -> KeyLayout:
        return KeyLayout(self.prefix, model)

    def versions(self, model: str) -> str:
        return f"{self.prefix}:@{model}:versions"

    def live(self, tenant: str) -> str:
        return f"{self.prefix}:{tenant}:live"
