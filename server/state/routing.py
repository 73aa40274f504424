"""A batch's Redis commands, one round trip per node, and Redis WAIT where replicas must confirm.

The store hands this module every key of a batch at once. On one node (or a Sentinel-managed
master) that is one MGET, or one script call followed by WAIT in the same pipeline. On a Redis
Cluster a script may only touch keys of one slot, so writes are grouped by slot (one script call per
slot) and redis-py's cluster pipeline sends each node its calls in one round trip, the nodes
concurrently; it also follows MOVED/ASK while a slot migrates. WAIT is per connection (it waits for
the replication offset of that connection's own last write), so in a cluster it is queued once per
node that took writes, targeted at that node: it travels on the same connection, after the scripts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server.state.connection import AsyncClient

_REDIRECTS = (redis_errors.MovedError, redis_errors.AskError, redis_errors.TryAgainError)


@dataclass(slots=True)
class ScriptResults:
    """Per item, the script's answer for its key; `unconfirmed` maps the items whose node's WAIT came
    back short to the number of replicas that did confirm."""

    results: list[Any]
    # None: the write was redirected to another node (a slot migrating), so no WAIT covered it.
    unconfirmed: dict[int, int | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    replicas: int = 0  # 0: no WAIT at all
    timeout_ms: int = 1000


class NodeRouter:
    def __init__(self, client: AsyncClient, wait: WaitPolicy) -> None:
        self.client = client
        self.wait = wait
        self.cluster = isinstance(client, RedisCluster)

    async def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET of every key: one MGET on one node; on a cluster one MGET per slot, batched per node."""
        if self.cluster:
            return await self.client.mget_nonatomic(keys)  # type: ignore[union-attr]
        return await self.client.mget(keys)

    async def run_script(self, script: str, items: Sequence[tuple[str, Sequence[Any]]]) -> ScriptResults:
        """Run the script over (key, per-key ARGV) items, grouped so that each call's keys share a slot.

        The script takes KEYS[i] with its arguments at ARGV[(i-1)*width + 1 ...] and returns one
        value per key, in KEYS order.
        """
        if not items:
            return ScriptResults([])
        sha = hashlib.sha1(script.encode()).hexdigest()
        results: list[Any] = [None] * len(items)
        unconfirmed: dict[int, int | None] = {}
        pending = await self._groups(items)
        for attempt in range(2):
            answers, waits = await self._send(sha, items, pending)
            missing = []
            for group, answer in zip(pending, answers, strict=True):
                redirected = isinstance(answer, _REDIRECTS)
                if redirected:
                    # Only when WAIT is on (redis-py follows redirects itself otherwise): the call did not
                    # run, so send it again through redis-py, which follows MOVED/ASK. That write went to
                    # another node than the WAIT, so it is applied but unconfirmed; its retry confirms it.
                    try:
                        answer = await self.client.execute_command(*self._call(sha, items, group))
                    except redis_errors.NoScriptError as exc:
                        answer = exc
                if isinstance(answer, redis_errors.NoScriptError) and attempt == 0:
                    missing.append(group)
                    continue
                if isinstance(answer, Exception):
                    raise answer
                for index, value in zip(group.indices, answer, strict=True):
                    results[index] = value
                if redirected:
                    unconfirmed.update(dict.fromkeys(group.indices))
                    continue
                confirmed = waits.get(group.node)
                if isinstance(confirmed, Exception):
                    raise confirmed
                if confirmed is not None and confirmed < self.wait.replicas:
                    unconfirmed.update(dict.fromkeys(group.indices, confirmed))
            if not missing:
                break
            # A fresh node (a promoted replica, a restarted or added master) has an empty script cache;
            # NOSCRIPT means the call did not run, so loading the script and sending it again is safe.
            await self.client.script_load(script)
            pending = missing
        return ScriptResults(results, unconfirmed)

    async def _groups(self, items: Sequence[tuple[str, Sequence[Any]]]) -> list[_Group]:
        if not self.cluster:
            return [_Group("", list(range(len(items))))]
        await self.client.initialize()  # type: ignore[union-attr]  # the slot map, once; a no-op afterwards
        by_slot: dict[int, _Group] = {}
        for index, (key, _) in enumerate(items):
            slot = self.client.keyslot(key)  # type: ignore[union-attr]
            if slot not in by_slot:
                node: ClusterNode = self.client.get_node_from_key(key)  # type: ignore[union-attr]
                by_slot[slot] = _Group(node.name, [])
            by_slot[slot].indices.append(index)
        return list(by_slot.values())

    async def _send(self, sha: str, items: Sequence[tuple[str, Sequence[Any]]],
                    groups: list[_Group]) -> tuple[list[Any], dict[str, Any]]:
        """One pipeline: the script calls, then one WAIT per node that took writes."""
        async with self.client.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.execute_command(*self._call(sha, items, group))  # the cluster pipeline has no evalsha()
            nodes = list(dict.fromkeys(group.node for group in groups)) if self.wait.replicas else []
            for node in nodes:
                target = {"target_nodes": self.client.get_node(node_name=node)} if self.cluster else {}  # type: ignore[union-attr]
                pipe.execute_command("WAIT", self.wait.replicas, self.wait.timeout_ms, **target)
            if self.cluster:
                # With WAIT, a redirected write must not be followed by redis-py behind our back: the WAIT
                # queued here would then ask the wrong node. run_script resends it and reports it unconfirmed.
                answers = await pipe.execute(raise_on_error=False, allow_redirections=not self.wait.replicas)
            else:
                answers = await pipe.execute(raise_on_error=False)
        return answers[: len(groups)], dict(zip(nodes, answers[len(groups):], strict=True))

    @staticmethod
    def _call(sha: str, items: Sequence[tuple[str, Sequence[Any]]], group: _Group) -> list[Any]:
        keys = [items[i][0] for i in group.indices]
        return ["EVALSHA", sha, len(keys), *keys, *(arg for i in group.indices for arg in items[i][1])]


@dataclass(slots=True)
class _Group:
    node: str  # cluster node name ("host:port"); "" on one node
    indices: list[int]
