"""A process topology that fails to start leaves nothing running (devkit/topology.py).

Before issue 23, a missing or failing Envoy left the topology's Redis and its replicas running: the
library's `start()` stopped nothing, and the script stopped them only for RuntimeError and TimeoutError.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devkit.processes import ServerProcess
from devkit.topology import Topology

pytestmark = pytest.mark.timeout(120)


def alive(topology: Topology) -> list[str]:
    """The topology's processes still running, named."""
    started = [("redis-server", topology.redis), ("envoy", topology.envoy),
               *((f"replica {member.index}", member.process) for member in topology.members)]
    return [name for name, process in started if process is not None and process.poll() is None]


def failing_envoy(folder: Path) -> Path:
    """An `envoy` that exits at once with an error, as Envoy does with a configuration it refuses."""
    folder.mkdir()
    envoy = folder / "envoy"
    envoy.write_text("#!/bin/sh\necho 'envoy: refusing to start' >&2\nexit 1\n")
    envoy.chmod(0o755)
    return folder


def test_an_envoy_that_exits_at_start_leaves_no_redis_or_replica_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{failing_envoy(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    topology = Topology(replicas=1, workdir=tmp_path / "topology", forks=ServerProcess.forks,
                        server_args=["--xla", "false"], ready_timeout_s=120)
    try:
        with pytest.raises(RuntimeError, match="envoy is not running"):
            topology.start()
        assert topology.redis is not None and topology.members[0].process is not None, "nothing was started"
        assert alive(topology) == [], f"left running after a failed start: {alive(topology)}"
    finally:
        topology.stop()


def test_a_missing_envoy_leaves_no_redis_or_replica_running(tmp_path: Path) -> None:
    topology = Topology(replicas=2, workdir=tmp_path / "topology", forks=ServerProcess.forks,
                        server_args=["--xla", "false"], envoy_binary=str(tmp_path / "no-such-envoy"))
    try:
        with pytest.raises(FileNotFoundError, match="no-such-envoy"):
            topology.start()
        assert topology.redis is not None and all(member.process for member in topology.members)
        assert alive(topology) == [], f"left running after a failed start: {alive(topology)}"
    finally:
        topology.stop()
