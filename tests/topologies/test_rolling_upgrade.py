"""A rolling upgrade from the previous release, under load (issue 29; docs/deploy.md, "Rolling upgrades").

The process topology (devkit/topology.py: Redis, two replicas, Envoy with deploy/envoy.yaml) starts with
both replicas running v0.1.0, from its commit's tree (devkit/releases.py), and a verified PredictStream
load runs through Envoy. While it runs, each replica in turn gets SIGTERM and is started again from this
checkout; then one is rolled back to v0.1.0 and upgraded again, all before the record-format floor is
raised. Every stream must verify against Keras (invariant 1, docs/invariants.md), none may see DATA_LOSS
or lose acknowledged state (invariant 8), and no record in Redis may be in a format v0.1.0 cannot read
(format 3) while a v0.1.0 replica could be serving. Then `lstm-serve admin record-format 3` raises the
floor, and a second verified load writes format-3 records (byte 10 of the slot record).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from devkit import ROOT
from devkit.processes import ServerProcess, wait_until
from devkit.releases import (
    PREVIOUS_RELEASE,
    ReleaseMissing,
    imported_server_package,
    materialise,
    release_env,
    server_command,
)
from devkit.topology import Topology
from server.config import DEFAULT_MODEL
from server.state.record import EARLIER_ANSWERS_FORMAT, MAGIC, NEWEST_FORMAT, PREVIOUS_RELEASE_FORMAT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

OK_CHUNKS = re.compile(r'^lstm_serve_chunks_total\{[^}]*outcome="(?:ok|replayed)"[^}]*\} ([0-9.e+]+)$', re.M)
FORMAT_AT = 10  # byte 10 of a slot record is its format (server/state/record.py)
SLOT_KEYS = "lstm:{*"  # the default --key-prefix, without API keys (server/state/keys.py)


def served(topology: Topology, index: int) -> int:
    """Chunks the replica's current process answered (its /metrics; a restart starts again from 0)."""
    return int(sum(float(value) for value in OK_CHUNKS.findall(topology.metrics(index))))


def record_formats(client: redis.Redis) -> list[int]:
    """The format of every slot record in Redis now."""
    values = [client.get(key) for key in client.scan_iter(match=SLOT_KEYS, count=1000)]
    return [value[FORMAT_AT] for value in values if value is not None and value[8:10] == MAGIC]


class FormatWatch:
    """Samples the formats of the slot records every 0.2 s in a thread: the newest seen while it ran."""

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.newest, self.samples = client, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.newest = max([self.newest, *record_formats(self.client)])
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def start_load(topology: Topology, prefix: str, report: Path, streams: int) -> subprocess.Popen[str]:
    """lstm-loadtest --api stream --verify through Envoy until SIGINT, retrying every break by offset."""
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--no-progress", "--target", topology.address, "--streams", str(streams),
         "--api", "stream", "--chunk", "5", "--rate", "5", "--duration", "300", "--warmup", "0",
         "--max-retries", "20", "--stream-prefix", prefix, "--verify", "--model", str(DEFAULT_MODEL),
         "--json", str(report)],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def running(load: subprocess.Popen[str]) -> bool:
    """True while the load runs; raises with its output once it has exited."""
    if load.poll() is not None:
        raise AssertionError(f"the load exited with {load.returncode}:\n{load.communicate()[0][-4000:]}")
    return True


def finish_load(load: subprocess.Popen[str], report: Path) -> dict:
    load.send_signal(signal.SIGINT)
    output, _ = load.communicate(timeout=120)
    assert load.returncode == 0, output[-4000:]
    result = json.loads(report.read_text())
    assert "DATA_LOSS" not in result["totals"]["errors"], result["totals"]["errors"]
    assert result["verify"]["passed"] and not result["verify"]["state_lost"], result["verify"]
    assert result["failed_chunks"] == 0 and result["broken_streams"] == [], result["broken_streams"]
    return result


def replace(topology: Topology, load: subprocess.Popen[str], index: int, source: Path | None) -> None:
    """SIGTERM replica `index`; once the other replica answers the streams it carried, start it again from
    `source` (None: this checkout) and wait until Envoy routes to it. A PredictStream stays on the replica
    it was opened on, so the restarted one gets streams only when the other is replaced in turn."""
    other = 1 - index
    before = served(topology, other)
    topology.stop_replica(index)
    wait_until(lambda: running(load) and served(topology, other) > before + 60, 60,
               f"replica {other} to take the streams of replica {index}")
    topology.start_replica(index, source)
    topology.wait_in_rotation(index)


def test_rolling_upgrade_from_the_previous_release_under_streaming_load(tmp_path: Path) -> None:
    try:
        old = materialise(PREVIOUS_RELEASE, tmp_path)
    except ReleaseMissing as missing:  # a checkout without history: nothing to upgrade from here
        pytest.skip(str(missing))
    # The replicas started from the tag run its code: its `server` package, which has no --version.
    assert imported_server_package(old) == (old / "server").resolve()
    assert subprocess.run(server_command("--version"), cwd=old, env=release_env(old), capture_output=True,
                          timeout=60).returncode == 2

    topology = Topology(replicas=2, workdir=tmp_path / "topology", forks=ServerProcess.forks,
                        server_args=["--xla", "false", "--drain-delay-s", "2"], envoy_concurrency=1)
    client = redis.Redis(port=topology.redis_port)
    load = watch = None
    try:
        topology.start_redis()
        for index in range(2):
            topology.start_replica(index, old)
        topology.start_envoy()
        for index in range(2):
            topology.wait_in_rotation(index)

        load = start_load(topology, "upgrade", tmp_path / "upgrade.json", streams=12)
        # Envoy may open every stream on one replica; each replacement below moves the streams of the one
        # stopped to the other, so each release in turn answers every stream the other wrote.
        wait_until(lambda: running(load) and served(topology, 0) + served(topology, 1) > 60, 60,
                   "the load to get going on v0.1.0")
        watch = FormatWatch(client)
        replace(topology, load, 0, None)  # v0.1.0 beside this release: records stay in the format it reads
        replace(topology, load, 1, None)  # this release takes every stream v0.1.0 wrote
        replace(topology, load, 1, old)  # rolled back before the floor is raised,
        replace(topology, load, 0, None)  # v0.1.0 takes every stream this release wrote
        replace(topology, load, 1, None)
        watch.stop()
        first = finish_load(load, tmp_path / "upgrade.json")
        assert watch.samples > 0 and watch.newest == PREVIOUS_RELEASE_FORMAT, watch.newest
        assert first["retries"] > 0, "no replacement broke a stream: nothing was tested"
        assert all(f == PREVIOUS_RELEASE_FORMAT for f in record_formats(client))

        # Every replica runs this release: the operator raises the floor, and records carry earlier answers.
        admin = subprocess.run(server_command("admin", "record-format", str(NEWEST_FORMAT)), cwd=ROOT,
                               env={**os.environ, "LSTM_SERVE_REDIS_URL": topology.redis_url},
                               capture_output=True, text=True, timeout=60)
        assert admin.returncode == 0, admin.stderr
        load = start_load(topology, "raised", tmp_path / "raised.json", streams=4)
        # Format 3 keeps earlier answers; format 4 would add input history, which these replicas do not keep.
        wait_until(lambda: running(load) and EARLIER_ANSWERS_FORMAT in record_formats(client), 60,
                   f"a record of format {EARLIER_ANSWERS_FORMAT}")
        second = finish_load(load, tmp_path / "raised.json")
        print(f"upgrade: {first['totals']['chunks']} chunks, errors {first['totals']['errors']}, retries "
              f"{first['retries']}, replays {first['replays']}; raised: {second['totals']['chunks']} chunks")
    finally:
        if watch is not None:
            watch.stop()
        if load is not None and load.poll() is None:
            load.kill()
            load.communicate()
        topology.stop()
        client.close()
