"""The test harness's own server starter: a port it chose that another process took before the server bound it
(an outgoing connection may get any free port) costs a retry on other ports, not the test."""

from __future__ import annotations

import socket

import pytest

from devkit import processes
from devkit.processes import RedisServer, ServerProcess

pytestmark = pytest.mark.timeout(240)


def test_a_metrics_port_taken_before_the_server_binds_it_is_chosen_again(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        chosen: list[int] = []
        free_port_run = processes.free_port_run

        def taken_first(count: int) -> int:
            # The race, made certain: the first port chosen is already someone else's.
            port = taken_port if not chosen else free_port_run(count)
            chosen.append(port)
            return port

        monkeypatch.setattr(processes, "free_port_run", taken_first)
        server = ServerProcess(redis_server.url)
        try:
            assert chosen[0] == taken_port and server.metrics_port == chosen[-1] != taken_port
            assert server.process.poll() is None
        finally:
            server.stop()
