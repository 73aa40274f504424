"""The one layout of this server's Redis keys (invariant 13, docs/invariants.md).

    <prefix>:{<stream_id>}                    a stream's slot, on a server without API keys
    <prefix>:<tenant>:{<stream_id>}           a stream's slot, with API keys: each tenant its own namespace
    <prefix>:@<model>:{<stream_id>}           a stream of a repository's model (docs/models.md): each model
    <prefix>:<tenant>:@<model>:{<stream_id>}  its own namespace, as Triton's sequences are per model
    <prefix>:<tenant>:live                    a limited tenant's live streams (server/state/live.py)
    <prefix>:@<model>:versions                a repository model's versions by fingerprint (registry.py)
    <prefix>:@<model>:live:{@<model>}         a model's versions that have live streams, and each one's
    <prefix>:@<model>:live:{@<model>}:<v>     live streams (live_versions.py), for a metric

A tenant name is 1-64 of [A-Za-z0-9_.-], never a brace or "@", so no tenant's slot key can equal another
tenant's, a model's, or a key without tenant; a model name has the same characters, so an "@" marks it. The
model of `--model FILE` keeps the keys without a model. A live set has no braces, so it never equals a slot
key. The braces are a Redis Cluster hash tag, so everything kept for one stream lands on one cluster slot; a
model's live-stream sets share the tag `{@<model>}`. Every slot key's braces follow `<prefix>:` or `@<model>:`
directly, so no other key matches `<prefix>:{*` or `<prefix>:@<model>:{*`.
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

    def live_versions(self, model: str) -> str:
        return f"{self.prefix}:@{model}:live:{{@{model}}}"

    def live_version(self, model: str, version: int) -> str:
        return f"{self.live_versions(model)}:{version}"
