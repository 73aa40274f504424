"""Issue 9, `--redis-wait-replicas`: a chunk is acknowledged only once Redis WAIT says enough replicas
hold it; invariants 8 and 9 (docs/invariants.md).

With no replica attached, WAIT comes back short: the chunk is answered UNAVAILABLE with a message
that says what is true (applied on the master, not acknowledged), its retry is refused the same way
until a replica holds it, and once a replica is attached the retry replays the stored answer (never
applying the chunk twice) and the stream goes on.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, status_of
from devkit.processes import free_port, wait_until
from devkit.redis_topologies import NodeProcess
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


def test_unconfirmed_chunk_is_unavailable_then_replayed_once_a_replica_holds_it(start_server) -> None:
    master = NodeProcess(free_port(), ["appendonly no", "repl-diskless-sync-delay 0"])
    replica = None
    try:
        server = start_server("--redis-wait-replicas", "1", "--redis-wait-timeout-ms", "500",
                              redis_url=f"redis://127.0.0.1:{master.port}/0")
        x = np.random.default_rng(7).normal(0, 1.5, size=(12, 1)).astype(np.float32)
        first, second = x[:5], x[5:]

        code, message, _ = status_of(predict, server.stub, "waited", first, reset=True, start_offset=0)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "applied on the Redis master, but only 0 of 1 replicas confirmed it within 500 ms" in message
        assert "retry it with its start_offset" in message
        # The message is honest: the chunk is on the master.
        status = server.stub.GetStream(pb.GetStreamRequest(stream_id="waited"), timeout=10)
        assert status.exists and status.offset == 5

        # A retry is not acknowledged either while no replica holds the chunk, and it is not applied twice.
        code, message, _ = status_of(predict, server.stub, "waited", first, reset=True, start_offset=0)
        assert code == grpc.StatusCode.UNAVAILABLE and "0 of 1 replicas" in message
        assert server.stub.GetStream(pb.GetStreamRequest(stream_id="waited"), timeout=10).offset == 5

        replica = NodeProcess(free_port(), ["appendonly no", f"replicaof 127.0.0.1 {master.port}"])
        wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up", 30,
                   "the replica to sync")

        def replay_once_confirmed() -> object:
            # WAIT's 500 ms can be short for a fresh replica on a busy machine: until then the honest
            # answer is still UNAVAILABLE, and the test retries as a client would.
            try:
                return predict(server.stub, "waited", first, reset=True, start_offset=0)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "replicas confirmed" in error.details()
                return None

        replayed = wait_until(replay_once_confirmed, 30, "the replica to confirm the chunk", interval_s=0.2)
        assert replayed.replayed and replayed.offset == 5
        assert replica.client().exists("lstm:{waited}")
        continued = predict(server.stub, "waited", second, start_offset=5)
        assert not continued.replayed and continued.offset == 12
        got = np.concatenate([outputs(replayed), outputs(continued)])
        assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    finally:
        master.stop()
        if replica is not None:
            replica.stop()


def test_an_old_master_cut_off_by_a_failover_answers_nothing_from_its_stale_slot(start_server) -> None:
    """A server still connected to the old master after its replica was promoted (Sentinel's
    connections live on until they fail) reads slots the new master has moved past. With WAIT, such a
    node cannot confirm anything, so it neither refuses a chunk from its stale slot ("the stream is at
    offset 5" when it is at 8: a wrong answer that breaks the client's sequence) nor acknowledges one:
    UNAVAILABLE, and the client's retry reaches the new master. Seen in CI as a sequence broken by
    "at offset 36, the chunk starts at 39" after a second failover (tests/redis/test_redis_sentinel.py)."""
    old = NodeProcess(free_port(), ["appendonly no", "repl-diskless-sync-delay 0"])
    new = NodeProcess(free_port(), ["appendonly no", f"replicaof 127.0.0.1 {old.port}"])
    try:
        wait_until(lambda: new.client().info("replication").get("master_link_status") == "up", 30,
                   "the replica to sync")
        on_old = start_server("--redis-wait-replicas", "1", redis_url=f"redis://127.0.0.1:{old.port}/0")
        x = np.random.default_rng(11).normal(0, 1.5, size=(8, 1)).astype(np.float32)
        predict(on_old.stub, "cut", x[:5], reset=True, start_offset=0)  # confirmed by the replica

        new.client().execute_command("REPLICAOF", "NO", "ONE")  # promoted; the old master keeps running
        on_new = start_server(redis_url=f"redis://127.0.0.1:{new.port}/0")
        assert predict(on_new.stub, "cut", x[5:], start_offset=5).offset == 8  # the stream moves on there

        code, message, _ = status_of(predict, on_old.stub, "cut", x[:3], start_offset=8)
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "only 0 of 1 replicas confirmed it" in message and "nothing was applied" in message
        # The chunk the new master applied is applied again on the old one, but never acknowledged there.
        code, message, _ = status_of(predict, on_old.stub, "cut", x[5:], start_offset=5)
        assert code == grpc.StatusCode.UNAVAILABLE and "0 of 1 replicas" in message, message
        assert on_new.stub.GetStream(pb.GetStreamRequest(stream_id="cut"), timeout=10).offset == 8
    finally:
        old.stop()
        new.stop()
