"""Issue 9: a Redis topology that does not match the configuration stops the server at start-up with
one clear line and exit code 2 (a configuration error: `--workers` does not restart it), before the
model is loaded. Invariant 8 (docs/invariants.md) covers faults at run time, not these."""

from __future__ import annotations

import pytest

from devkit.processes import RedisServer, free_port, serve_until_exit
from devkit.redis_topologies import SentinelGroup

pytestmark = pytest.mark.timeout(120)


def test_cluster_flag_against_a_plain_redis(redis_server: RedisServer) -> None:
    result = serve_until_exit("--redis-url", redis_server.url, "--redis-cluster")
    assert result.returncode == 2, result.stderr
    assert "is not a cluster node (cluster_enabled:0)" in result.stderr
    assert "drop --redis-cluster" in result.stderr


@pytest.fixture(scope="module")
def sentinels():
    group = SentinelGroup(replicas=0, sentinels=1)
    yield group
    group.stop()


def test_unknown_sentinel_master(sentinels: SentinelGroup) -> None:
    result = serve_until_exit("--redis-sentinels", sentinels.addresses, "--redis-sentinel-master", "no-such-master")
    assert result.returncode == 2, result.stderr
    assert "do not monitor a master named 'no-such-master'" in result.stderr
    assert f"they monitor: {SentinelGroup.MASTER_NAME}" in result.stderr


def test_no_sentinel_reachable() -> None:
    nobody = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    result = serve_until_exit("--redis-sentinels", nobody, "--redis-sentinel-master", "mymaster")
    assert result.returncode == 2, result.stderr
    assert "no sentinel answered" in result.stderr
    assert nobody.split(",")[1] in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--redis-sentinels", "127.0.0.1:1"), "--redis-sentinels needs --redis-sentinel-master"),
        (("--redis-sentinels", "127.0.0.1"), "--redis-sentinels: expected host:port, got '127.0.0.1'"),
        (("--redis-cluster", "--redis-sentinels", "127.0.0.1:1", "--redis-sentinel-master", "m"), "exclude each other"),
        (("--redis-wait-timeout-ms", "0",), "--redis-wait-timeout-ms must be at least 1"),
    ],
)
def test_inconsistent_flags(flags: tuple[str, ...], message: str) -> None:
    result = serve_until_exit(*flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
