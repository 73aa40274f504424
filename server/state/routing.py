"""Which Redis node a batch's keys live on, and one round trip per node for their reads and scripts.

On one node (or a Sentinel-managed master) a batch is one group. On a Redis Cluster a script or a
multi-key command may only touch keys of one slot, so each node's keys are split by slot: one MGET
(or one script call) per slot, all of a node's calls in one redis-py cluster pipeline, which is one
round trip to that node. The store runs the nodes concurrently, each under its own deadline and
retries (store.py, attempts.py). redis-py finds the nodes and follows MOVED/ASK while a slot migrates.

Redis WAIT (`--redis-wait-replicas`) is per connection: it waits for the replication offset of that
connection's own last write. So it is queued in the same pipeline, after the node's script calls,
targeted at that node: it travels on the same connection. With WAIT on, a redirected call is not
left to redis-py inside the pipeline (the WAIT would then vouch for the wrong node): it is resent
through redis-py on its own and reported unconfirmed, and its retry confirms it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from server.state.connection import AsyncClient

_REDIRECTS = (redis_errors.MovedError, redis_errors.AskError)


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """--redis-wait-replicas and --redis-wait-timeout-ms (invariant 8)."""

    replicas: int  # 0: no WAIT at all
    timeout_ms: int


NO_WAIT = WaitPolicy(replicas=0, timeout_ms=0)  # acknowledge once the master has the write


@dataclass(slots=True)
class NodeGroup:
    """The keys of a batch that one node holds, by slot (indices into the batch's key list)."""

    node: str  # "host:port" of a cluster master; "" on one node
    slots: list[list[int]] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        return [i for slot in self.slots for i in slot]


@dataclass(slots=True)
class ScriptResults:
    """The script's answer per key (in `NodeGroup.indices` order); `unconfirmed` maps the batch indices
    whose writes WAIT did not confirm to the number of replicas that did (None: no WAIT could cover it)."""

    results: list[Any]
    unconfirmed: dict[int, int | None] = field(default_factory=dict)


class NodeRouter:
    def __init__(self, client: AsyncClient, wait: WaitPolicy) -> None:
        self.client = client
        self.wait = wait
        self.cluster = isinstance(client, RedisCluster)

    async def groups(self, keys: Sequence[str]) -> list[NodeGroup]:
        if not self.cluster:
            return [NodeGroup("", [list(range(len(keys)))])]
        client: RedisCluster = self.client  # type: ignore[assignment]
        await client.initialize()  # the slot map, once; a no-op afterwards
        by_node: dict[str, dict[int, list[int]]] = {}
        for index, key in enumerate(keys):
            node = client.get_node_from_key(key).name
            by_node.setdefault(node, {}).setdefault(client.keyslot(key), []).append(index)
        return [NodeGroup(node, list(slots.values())) for node, slots in by_node.items()]

    async def read(self, keys: Sequence[str], group: NodeGroup) -> list[tuple[list[bytes | None], int]]:
        """Per slot of the group: (MGET of its keys, EXISTS count of its keys), in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for slot in group.slots:
                slot_keys = [keys[i] for i in slot]
                pipe.execute_command("MGET", *slot_keys)
                pipe.execute_command("EXISTS", *slot_keys)
            answers = await pipe.execute()
        return [(answers[2 * n], int(answers[2 * n + 1])) for n in range(len(group.slots))]

    async def run_script(self, script: str, items: Sequence[tuple[str, Sequence[Any]]],
                         group: NodeGroup) -> ScriptResults:
        """The script over the group's (key, per-key ARGV) items, one call per slot, then WAIT.

        The script takes KEYS[i] with its arguments at ARGV[(i-1)*width + 1 ...] and returns one value
        per key, in KEYS order. Errors are raised as redis-py raises them (the caller decides on retries).
        """
        sha = hashlib.sha1(script.encode()).hexdigest()
        answers, confirmed = await self._send(sha, items, group)
        if any(isinstance(a, redis_errors.NoScriptError) for a in answers):
            # A fresh node (a promoted replica, a restarted or added master) has an empty script cache;
            # NOSCRIPT means no call ran, so loading the script and sending them again is safe.
            await self.client.script_load(script)
            answers, confirmed = await self._send(sha, items, group)
        results: list[Any] = []
        unconfirmed: dict[int, int | None] = {}
        for slot, answer in zip(group.slots, answers, strict=True):
            if isinstance(answer, _REDIRECTS):
                # Only with WAIT on (redis-py follows redirects itself otherwise): this call did not run;
                # redis-py sends it again to the slot's new node, which the WAIT above did not ask.
                answer = await self.client.execute_command(*self._call(sha, items, slot))
                unconfirmed.update(dict.fromkeys(slot))
            elif isinstance(answer, Exception):
                raise answer
            elif confirmed is not None and confirmed < self.wait.replicas:
                unconfirmed.update(dict.fromkeys(slot, confirmed))
            results.extend(answer)
        return ScriptResults(results, unconfirmed)

    async def _send(self, sha: str, items: Sequence[tuple[str, Sequence[Any]]],
                    group: NodeGroup) -> tuple[list[Any], int | None]:
        """One pipeline to the group's node: a script call per slot, then WAIT when replicas must confirm."""
        async with self.client.pipeline(transaction=False) as pipe:
            for slot in group.slots:
                pipe.execute_command(*self._call(sha, items, slot))  # the cluster pipeline has no evalsha()
            if self.wait.replicas:
                target = {"target_nodes": self.client.get_node(node_name=group.node)} if self.cluster else {}  # type: ignore[union-attr]
                pipe.execute_command("WAIT", self.wait.replicas, self.wait.timeout_ms, **target)
            if self.cluster:
                answers = await pipe.execute(raise_on_error=False, allow_redirections=not self.wait.replicas)
            else:
                answers = await pipe.execute(raise_on_error=False)
        if not self.wait.replicas:
            return answers, None
        confirmed = answers[-1]
        if isinstance(confirmed, Exception):
            raise confirmed
        return answers[:-1], int(confirmed)

    @staticmethod
    def _call(sha: str, items: Sequence[tuple[str, Sequence[Any]]], slot: list[int]) -> list[Any]:
        keys = [items[i][0] for i in slot]
        return ["EVALSHA", sha, len(keys), *keys, *(arg for i in slot for arg in items[i][1])]
