"""Issue 9, Redis Cluster: a three-master cluster built in the test, the server routing by node and slot.

- Invariant 1 (docs/invariants.md), continuation, holds through the cluster on both protocols (native,
  and Triton via tritonclient in a child process), and the streams spread over every master (the
  `{stream_id}` hash tag).
- GetStream, ResetStream, expiry and ended sequences work on a cluster.
- WAIT goes to each node that took the batch's writes, once per node, and only there.
- Invariants 8 and 11: slots that hold streams migrate between masters in the middle of a load
  (MOVED/ASK, followed by redis-py) and `lstm-loadtest --verify`, retrying by offset, loses nothing.
- Invariant 8: on a cluster with a replica per master, a master is SIGKILLed in the middle of such a
  load; its replica is promoted, and with `--redis-wait-replicas 1` nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import redis

from devkit import ROOT
from devkit.loads import VerifiedLoad, assert_nothing_lost, summary
from devkit.processes import ServerProcess, serve_until_exit, wait_until
from devkit.redis_topologies import RedisClusterNodes, stream_keys
from devkit.references import TOLERANCE, keras_whole_sequences
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL
from server.state.connection import RedisTopology
from server.state.record import SlotRecord, new_version
from server.state.routing import WaitPolicy
from server.state.store import APPLIED, SlotWrite, StateStore
from tests.serving.test_continuation import make_streams, run_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
STATE_TTL_S = 600


@pytest.fixture(scope="module")
def cluster():
    nodes = RedisClusterNodes(masters=3)
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def cluster_server(cluster: RedisClusterNodes):
    server = ServerProcess(cluster.url, DEFAULT_MODEL, "--redis-cluster", "--state-ttl-s", str(STATE_TTL_S),
                           "--live-streams-interval-s", "0.2")
    yield server
    server.stop()


def slot_of(stream_id: str, key_prefix: str = "lstm") -> int:
    """The cluster slot of a stream's key (StateStore.key: the stream id is the key's hash tag)."""
    return redis.crc.key_slot(f"{key_prefix}:{{{stream_id}}}".encode())


def triton_sequences(address: str, count: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sequences split at random over Triton's sequence parameters, sent by tritonclient in a process of
    its own (devkit/triton_sequences.py says why): id -> (inputs, concatenated outputs)."""
    result = subprocess.run([sys.executable, "-m", "devkit.triton_sequences", address, str(count), str(seed)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180, check=True)
    runs = json.loads(result.stdout)
    return {sid: (np.asarray(r["x"], np.float32), np.asarray(r["y"], np.float32)) for sid, r in runs.items()}


def test_continuation_through_a_cluster_on_both_protocols(cluster, cluster_server: ServerProcess) -> None:
    before = [stream_keys(node) for node in cluster.nodes]
    streams = make_streams(seed=9, features=1, prefix=f"cluster-{uuid.uuid4().hex[:6]}")
    native = asyncio.run(run_all(cluster_server.address, streams))
    # Stream ids live in the key's hash tag; counted before the Triton sequences end (and leave only a
    # short-lived answer behind).
    held = [stream_keys(node) - b for node, b in zip(cluster.nodes, before, strict=True)]
    triton_runs = triton_sequences(cluster_server.address, count=12, seed=9)

    got = {**native, **{sid: y for sid, (_, y) in triton_runs.items()}}
    inputs = {**{sid: x for sid, (x, _) in streams.items()}, **{sid: x for sid, (x, _) in triton_runs.items()}}
    expected = dict(zip(inputs, keras_whole_sequences(DEFAULT_MODEL, list(inputs.values())), strict=True))
    worst = 0.0
    for stream_id, y in got.items():
        assert y.shape == expected[stream_id].shape, stream_id
        diff = float(np.max(np.abs(y - expected[stream_id])))
        assert diff <= TOLERANCE, f"{stream_id}: max abs diff {diff}"
        worst = max(worst, diff)
    print(f"max abs diff over {len(got)} streams ({len(triton_runs)} over Triton): {worst:.3g}; "
          f"streams per master: {held}")
    # The hash tag spreads the streams over every master.
    assert all(count > 0 for count in held), held
    assert sum(held) == len(streams)


def test_get_reset_expiry_and_ended_streams_on_a_cluster(cluster, cluster_server: ServerProcess) -> None:
    from devkit.native_calls import predict

    stub = cluster_server.stub
    ids = [f"cluster-ops-{uuid.uuid4().hex[:6]}-{n}" for n in range(12)]  # several slots, so several nodes
    for stream_id in ids:
        predict(stub, stream_id, np.ones((4, 1), np.float32), reset=True)
    for stream_id in ids:
        status = stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=10)
        assert status.exists and status.offset == 4
        assert 0 < status.expires_in_ms <= STATE_TTL_S * 1000
    assert stub.ResetStream(pb.ResetStreamRequest(stream_id=ids[0]), timeout=10)
    assert not stub.GetStream(pb.GetStreamRequest(stream_id=ids[0]), timeout=10).exists
    last = np.full((2, 1), 0.5, np.float32)
    ended = predict(stub, ids[1], last, end=True, start_offset=4)
    assert not stub.GetStream(pb.GetStreamRequest(stream_id=ids[1]), timeout=10).exists
    again = predict(stub, ids[1], last, end=True, start_offset=4)  # the kept answer of the ended stream
    assert again.replayed and list(again.outputs) == list(ended.outputs)

    # Live streams per version are counted in one hash slot of the cluster (server/state/live_versions.py):
    # the ten still live, not the reset one nor the ended one.
    client = redis.RedisCluster.from_url(cluster.url)
    live = "lstm:@sensor_forecaster:live:{@sensor_forecaster}:1"
    try:
        wait_until(lambda: [client.zscore(live, f"/{s}") is not None for s in ids] == [False, False] + [True] * 10,
                   30, "the live streams counted")
    finally:
        client.close()


def test_cluster_node_without_the_cluster_flag_is_refused(cluster: RedisClusterNodes) -> None:
    result = serve_until_exit("--redis-url", cluster.url)
    assert result.returncode == 2, result.stderr
    assert "is a Redis Cluster node; add --redis-cluster" in result.stderr


def _deadline() -> float:
    return time.monotonic() + 30


def _record() -> SlotRecord:
    return SlotRecord(version=new_version(), offset=1, updated_unix_ms=1, fingerprint=b"\0" * 8, last_start=0,
                      last_digest=b"\0" * 16, last_request_id=b"\0" * 16, state=np.zeros(2, np.float32),
                      last_outputs=np.zeros((1, 1), np.float32), ended=False)


def test_wait_goes_once_to_each_node_that_took_writes(cluster: RedisClusterNodes) -> None:
    # No replicas in this cluster, so WAIT 1 comes back with 0: every applied write is unconfirmed.
    prefix = f"w{uuid.uuid4().hex[:6]}"
    ids = [f"s{n}" for n in range(30)]
    owners = {cluster.owner_of(slot_of(s, prefix)).port for s in ids}
    assert len(owners) == 3

    def calls(command: str) -> dict[int, int]:
        stats = {node.port: node.client().info("commandstats") for node in cluster.nodes}
        return {port: s.get(f"cmdstat_{command}", {}).get("calls", 0) for port, s in stats.items()}

    async def save() -> list:
        store = StateStore(RedisTopology(cluster.url, cluster=True), key_prefix=prefix,
                           wait=WaitPolicy(replicas=1, timeout_ms=20))
        try:
            # The first call loads the script (NOSCRIPT, then a resend): not counted.
            await store.save([SlotWrite("warm-up", b"", _record(), 60_000)], _deadline())
            waits_before.update(calls("wait"))
            scripts_before.update(calls("evalsha"))
            return await store.save([SlotWrite(s, b"", _record(), 60_000) for s in ids], _deadline())
        finally:
            await store.close()

    waits_before: dict[int, int] = {}
    scripts_before: dict[int, int] = {}
    outcome = asyncio.run(save())
    waits = {port: n - waits_before[port] for port, n in calls("wait").items()}
    scripts = {port: n - scripts_before[port] for port, n in calls("evalsha").items()}
    assert waits == {port: 1 for port in owners}
    slots_per_node = {port: len({slot_of(s, prefix) for s in ids if cluster.owner_of(slot_of(s, prefix)).port == port})
                      for port in owners}
    assert scripts == slots_per_node  # one compare-and-set call per slot
    assert all(getattr(result, "code", None) is not None and "0 of 1 replicas" in result.message for result in outcome)


def test_used_memory_is_the_sum_over_the_masters(cluster: RedisClusterNodes) -> None:
    # lstm_serve_redis_used_memory_bytes on a cluster: every master's INFO memory, read through a fresh store
    # (whose client has not met the cluster yet: the masters must be found first, not summed as none).
    async def used() -> int | None:
        store = StateStore(RedisTopology(cluster.url, cluster=True), key_prefix="lstm")
        try:
            return await store.used_memory()
        finally:
            await store.close()

    reported = asyncio.run(used())
    masters = sum(node.client().info("memory")["used_memory"] for node in cluster.nodes)  # no replicas here
    assert reported is not None and 0.8 * masters < reported < 1.2 * masters, (reported, masters)


def test_a_write_redirected_mid_migration_is_not_acknowledged_without_wait(cluster: RedisClusterNodes) -> None:
    # With WAIT on, a write that is redirected (ASK: its key already moved to the importing node) lands on
    # another node than the queued WAIT asked: it is applied, and answered UNAVAILABLE until confirmed.
    prefix = f"ask{uuid.uuid4().hex[:6]}"
    key = f"{prefix}:{{moving}}"
    slot = redis.crc.key_slot(key.encode())
    source = cluster.owner_of(slot)
    target = next(node for node in cluster.nodes if node is not source)

    async def scenario() -> tuple[list, object]:
        plain = StateStore(RedisTopology(cluster.url, cluster=True), key_prefix=prefix)
        waiting = StateStore(RedisTopology(cluster.url, cluster=True), key_prefix=prefix,
                             wait=WaitPolicy(replicas=1, timeout_ms=20))
        try:
            first = _record()
            assert await plain.save([SlotWrite("moving", b"", first, 60_000)], _deadline()) == [APPLIED]
            source_client, target_client = source.client(), target.client()
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
            source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
            outcome = await waiting.save([SlotWrite("moving", first.version, _record(), 60_000)], _deadline())
            for node in cluster.nodes:
                node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
            return outcome, (await plain.load(["moving"], _deadline()))[0]
        finally:
            await plain.close()
            await waiting.close()

    outcome, stored = asyncio.run(scenario())
    assert getattr(outcome[0], "code", None) is not None, outcome
    assert "its slot was moving between cluster nodes" in outcome[0].message
    assert stored is not None and stored.version != b"" and target.client().exists(key)


def test_slot_migration_in_the_middle_of_a_load_loses_nothing(cluster, cluster_server: ServerProcess) -> None:
    load = VerifiedLoad(cluster_server.address, f"mig-{uuid.uuid4().hex[:6]}", streams=16, total_chunks=1200,
                        timeout_s=5, max_retries=30)
    source, target = cluster.nodes[0], cluster.nodes[1]
    streams = {n: slot_of(load.stream_id(n)) for n in range(load.config.streams)}
    slots = sorted({slot for slot in streams.values() if cluster.owner_of(slot) is source})
    assert slots, "no stream of the load on the first master"
    load.start(cluster_server.stub, stream=next(n for n, slot in streams.items() if slot in slots), offset=9,
               timeout_s=60)
    moved, rounds = 0, 0
    while load.running and rounds < 20:  # back and forth until the load is done
        here, there = (source, target) if rounds % 2 == 0 else (target, source)
        moved += sum(cluster.migrate_slot(slot, here, there) for slot in slots)
        rounds += 1
    report = load.finish(120)
    print(f"migrations: {rounds} rounds of {len(slots)} slots, {moved} keys moved; {summary(report)}")
    assert moved > 0 and rounds >= 1
    assert_nothing_lost(load, report)


def test_master_failover_in_the_middle_of_a_load_loses_no_acknowledged_chunk() -> None:
    """Invariant 8 on a cluster: the master holding some streams is SIGKILLed mid-load; the cluster
    promotes its replica, the server follows (calls in between get UNAVAILABLE, never a wrong answer),
    and with --redis-wait-replicas 1 (every master's one replica) nothing acknowledged is lost. The
    killed node is started again and rejoins as the new master's replica, so WAIT can be met again."""
    cluster = RedisClusterNodes(masters=3, replicas=1, node_timeout_ms=1000)
    server = None
    try:
        server = ServerProcess(cluster.url, DEFAULT_MODEL, "--redis-cluster", "--redis-wait-replicas", "1",
                               "--state-ttl-s", str(STATE_TTL_S))
        load = VerifiedLoad(server.address, f"fail-{uuid.uuid4().hex[:6]}", streams=12, total_chunks=900,
                            timeout_s=10, max_retries=40)
        owners = {n: cluster.owner_of(slot_of(load.stream_id(n))) for n in range(load.config.streams)}
        # A master other than the node the server was given, holding at least one stream of the load.
        victim = next(node for node in cluster.nodes[1:] if node in owners.values())
        stream = next(n for n, owner in owners.items() if owner is victim)
        load.start(server.stub, stream=stream, offset=30, timeout_s=120)
        victim.stop(signal.SIGKILL)
        promoted = wait_until(lambda: (owner := cluster.owner_of(slot_of(load.stream_id(stream)))) is not victim
                              and owner, 60,
                              "the cluster to promote the killed master's replica")
        victim.start()  # back as the new master's replica (its nodes.conf says so), so WAIT 1 is met again
        report = load.finish(300)
        print(f"failover {victim.port} -> {promoted.port}: {summary(report)}")
        assert_nothing_lost(load, report)
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
