"""The compose topology as processes (devkit/topology.py; scripts/topology.py is its command line): Redis,
two replicas, Envoy with deploy/envoy.yaml.

lstm-loadtest --verify runs through Envoy while one replica is SIGKILLed and started again, and then
while each replica in turn gets SIGTERM and is started again (a rolling restart). Every stream must
verify against Keras (invariant 1, docs/invariants.md), with nothing lost (invariant 8) or applied
twice (invariant 4: a retried chunk is answered again, never applied twice); calls may fail only as
UNAVAILABLE, which the client retries with its start_offset (invariant 11); and both replicas must have
served chunks (read from their /metrics). The same kill under PredictStream load: Envoy's reset of the
streams (`INTERNAL: Stream removed`) is a break the load tester resumes, and every sequence verifies.
And the script itself is one command that Ctrl-C stops
cleanly: exit 0, nothing left listening.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devkit import ROOT
from devkit.processes import ServerProcess, free_port, wait_until
from devkit.topology import ENVOY_CONFIG, HTTP_CLUSTER, HTTP_LISTENER, Topology, local_envoy_config
from server.config import DEFAULT_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OK_CHUNKS = re.compile(r'^lstm_serve_chunks_total\{[^}]*outcome="(?:ok|replayed)"[^}]*\} ([0-9.e+]+)$', re.M)


def without_addresses(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"] = None
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = None
    config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"] = None
    return config


def test_the_local_envoy_config_changes_only_the_addresses(tmp_path: Path) -> None:
    deployed = yaml.safe_load(ENVOY_CONFIG.read_text())
    before = copy.deepcopy(deployed)
    local = local_envoy_config(deployed, ("127.0.0.1", 41000), ("127.0.0.1", 41001),
                               [("127.0.0.1", 41010), ("127.0.0.1", 41011)])
    assert deployed == before, "the deployed configuration must not be modified in place"
    # The local replicas serve gRPC only: the HTTP/REST listener and cluster are left out, nothing else.
    grpc_only = copy.deepcopy(deployed)
    for kind, name in (("listeners", HTTP_LISTENER), ("clusters", HTTP_CLUSTER)):
        grpc_only["static_resources"][kind] = [item for item in grpc_only["static_resources"][kind]
                                               if item["name"] != name]
    assert len(grpc_only["static_resources"]["listeners"]) == len(deployed["static_resources"]["listeners"]) - 1
    assert without_addresses(local) == without_addresses(grpc_only)
    assert local["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 41001}
    assert local["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 41000}
    endpoints = local["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "127.0.0.1", "port_value": 41010}, {"address": "127.0.0.1", "port_value": 41011}]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(local))
    envoy = Path(sys.executable).parent / "envoy"
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def served(topology: Topology, index: int) -> int:
    return int(sum(float(value) for value in OK_CHUNKS.findall(topology.metrics(index))))


def start_load(topology: Topology, report_path: Path, *args: str) -> subprocess.Popen[str]:
    """`lstm-loadtest --verify` through Envoy, open loop, until SIGINT (then it reports and verifies)."""
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--no-progress", "--target", topology.address, *args, "--chunk", "5",
         "--duration", "240", "--warmup", "0", "--max-retries", "10", "--verify", "--model", str(DEFAULT_MODEL),
         "--json", str(report_path)],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def end_load(load: subprocess.Popen[str] | None) -> None:
    if load is not None and load.poll() is None:
        load.kill()
        load.communicate()


def verified(report_path: Path, streams: int) -> dict[str, Any]:
    """The load's report, once it says every stream verified and nothing broke or stayed unanswered."""
    report = json.loads(report_path.read_text())
    assert report["verify"]["passed"], report["verify"]
    assert report["verify"]["streams"] == streams and not report["verify"]["state_lost"]
    assert report["failed_chunks"] == 0 and report["broken_streams"] == [], report["broken_streams"]
    assert report["retries"] == sum(report["totals"]["errors"].values())  # every failed attempt was retried
    return report


def test_loadtest_through_envoy_survives_a_killed_replica_and_a_rolling_restart(tmp_path: Path) -> None:
    # --xla false: a replica starts in seconds (no XLA compilations), which keeps the restarts short; a
    # drain delay of 3 s still outlasts Envoy's detection of NOT_SERVING (2 checks 1 s apart).
    topology = Topology(replicas=2, workdir=tmp_path / "topology", forks=ServerProcess.forks,
                        server_args=["--xla", "false", "--drain-delay-s", "3"], envoy_concurrency=1)
    report_path = tmp_path / "report.json"
    totals = [0, 0]
    load = None
    try:
        topology.start()
        # Open loop, so the load leaves CPU for the restarts.
        load = start_load(topology, report_path, "--streams", "8", "--rate", "25")
        wait_until(lambda: served(topology, 0) > 20 and served(topology, 1) > 20, 60, "both replicas to serve")

        # SIGKILL in the middle of the run: chunks in flight on it fail as UNAVAILABLE and are retried.
        totals[0] += served(topology, 0)
        topology.stop_replica(0, signal.SIGKILL)
        topology.start_replica(0)
        topology.wait_in_rotation(0)
        wait_until(lambda: served(topology, 0) > 0, 30, "the restarted replica to serve again")

        # Rolling restart: SIGTERM each replica in turn, start it again, wait until Envoy routes to it.
        for index in (1, 0):
            totals[index] += served(topology, index)
            assert topology.stop_replica(index, signal.SIGTERM) is not None
            topology.start_replica(index)
            topology.wait_in_rotation(index)
            wait_until(lambda i=index: served(topology, i) > 0, 30, f"replica {index} to serve again")
        totals = [total + served(topology, index) for index, total in enumerate(totals)]

        load.send_signal(signal.SIGINT)  # ends the load; lstm-loadtest still verifies and writes its report
        output, _ = load.communicate(timeout=120)
        assert load.returncode == 0, output
    finally:
        end_load(load)
        topology.stop()

    report = verified(report_path, 8)
    assert set(report["totals"]["errors"]) <= {"UNAVAILABLE"}, report["totals"]["errors"]
    assert report["totals"]["chunks"] > 0
    assert all(total > 0 for total in totals), totals
    print(f"chunks per replica {totals}, errors {report['totals']['errors']}, retries {report['retries']}, "
          f"replays {report['replays']}")


def test_streaming_load_through_envoy_resumes_across_a_killed_replica(tmp_path: Path) -> None:
    """Issue 24, item 10: a replica SIGKILLed under PredictStream load. Envoy resets the streams it carried
    and gRPC reports them as `INTERNAL: Stream removed` (RST_STREAM), not UNAVAILABLE; the load tester
    must take that as a break (invariant 11), resend the unanswered chunk on a new call, and every
    sequence must verify: exit 0, no broken stream, retries > 0."""
    topology = Topology(replicas=2, workdir=tmp_path / "topology", forks=ServerProcess.forks,
                        server_args=["--xla", "false", "--drain-delay-s", "3"], envoy_concurrency=1)
    report_path = tmp_path / "report.json"
    load = None
    try:
        topology.start()
        load = start_load(topology, report_path, "--streams", "16", "--api", "stream", "--rate", "10")
        # Envoy may open every stream on one replica: the one that serves most is killed.
        wait_until(lambda: served(topology, 0) + served(topology, 1) > 100, 60, "the load to get going")
        victim = max((0, 1), key=lambda index: served(topology, index))
        other = 1 - victim
        before = served(topology, other)
        topology.stop_replica(victim, signal.SIGKILL)  # the streams it carried break under their chunks
        wait_until(lambda: served(topology, other) > before + 100, 60, "the other replica to take the streams")
        topology.start_replica(victim)
        topology.wait_in_rotation(victim)
        load.send_signal(signal.SIGINT)
        output, _ = load.communicate(timeout=120)
        assert load.returncode == 0, output
    finally:
        end_load(load)
        topology.stop()

    report = verified(report_path, 16)
    assert report["retries"] > 0, "the kill broke no stream: nothing was tested"
    print(f"errors {report['totals']['errors']}, retries {report['retries']}, replays {report['replays']}")


def test_the_script_is_one_command_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    ports = {"--port": free_port(), "--replica-port": free_port(), "--metrics-port": free_port(),
             "--redis-port": free_port()}
    command = [sys.executable, str(ROOT / "scripts" / "topology.py"), "--replicas", "1", "--workdir",
               str(tmp_path), *(str(part) for item in ports.items() for part in item), "--", "--xla", "false"]
    script = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        assert script.stdout is not None
        for line in script.stdout:
            lines.append(line)
            if "topology: ready" in line or "topology: timed out" in line:
                break
        assert "topology: ready" in lines[-1], "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{ports['--port']}") as channel:  # a client through Envoy
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        script.send_signal(signal.SIGINT)
        rest, _ = script.communicate(timeout=60)
    finally:
        if script.poll() is None:
            script.kill()
            script.communicate()
    assert script.returncode == 0, "".join(lines) + rest
    assert rest.strip().endswith("topology: stopped"), rest
    for name in ("--port", "--replica-port", "--redis-port"):  # Envoy, the replica and Redis are gone
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", ports[name])) != 0, f"{name} {ports[name]} still open"
