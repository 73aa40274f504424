"""`lstm-loadtest --model-name --verify --verify-repository` while a new model version appears (invariant 14,
docs/invariants.md; docs/loadtest.md, "Models and versions"): v1 serves the load, v2 is renamed into the
repository mid-load and the server picks it up by polling. Nothing is lost, every sequence begun on v1 goes
on exactly on v1 (the server says so mid-load, the verifier checks every answer against v1's Keras model),
and every sequence begun after v2 arrived runs on v2 and equals v2's Keras model.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from devkit.processes import wait_until
from devkit.repositories import install
from devkit.small_models import build_lstm
from loadtest import EXIT_OK, LoadConfig, run_load
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(180)


def listed(stub) -> dict[tuple[str, int], str]:
    return {(row.name, row.version): row.state for row in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


# Through gateways: that transport carries the most (versions and migrations out of a message's results). The
# native transports read the same fields of PredictResponse (loadtest/drivers.py); tests/serving/test_client_models.py
# covers a handle's versions and migrations.
def test_a_version_renamed_in_mid_load_takes_the_new_sequences_and_the_old_ones_finish_on_theirs(
        start_server, tmp_path: Path) -> None:
    api, gateways = "stream", 2
    repository = tmp_path / "models"
    v1_file, v2_file = build_lstm(tmp_path / "v1.keras", seed=1), build_lstm(tmp_path / "v2.keras", seed=2)
    install(repository, "m", 1, v1_file)
    server = start_server("--model-repository", str(repository), "--repository-poll-s", "0.2",
                          "--version-drain-s", "60", "--xla", "false")
    prefix = f"lt-v-{uuid.uuid4().hex[:6]}"
    # 20 chunks/s a stream and 50 chunks a sequence: each sequence lasts 2.5 s, so sequences are under way on
    # v1 when v2 arrives (and still under way once it is READY, on a busy machine too), and new ones keep
    # starting after it.
    config = LoadConfig(target=server.address, streams=4, chunk_timesteps=4, api=api, gateways=gateways, rate=20.0,
                        duration_s=6.0, warmup_s=0, model_name="m", sequence_chunks=50, stream_prefix=prefix,
                        verify=True, verify_repository=str(repository), verify_sample=2)
    reports: list[dict] = []
    load = threading.Thread(target=lambda: reports.append(run_load(config)), daemon=True)

    def where(n: int) -> pb.StreamInfo:
        return server.stub.GetStream(pb.GetStreamRequest(stream_id=f"{prefix}-{n}", model="m"), timeout=5)

    load.start()
    wait_until(lambda: not load.is_alive() or where(0).offset >= 20, 60, "the load to get going")
    assert load.is_alive(), "the load ended before the new version arrived"
    install(repository, "m", 2, v2_file)
    wait_until(lambda: listed(server.stub).get(("m", 2)) == "READY", 60, "v2 to load")
    assert listed(server.stub)[("m", 1)] == "DRAINING"
    arrived = time.monotonic()
    # The sequences under way on v1 when v2 became READY: at least one of them goes on, on v1.
    under_way = {n: info.offset for n in range(config.streams) if (info := where(n)).model_version == 1
                 and info.exists and info.offset > 0}
    assert under_way, "no sequence was under way on v1 when v2 arrived"
    wait_until(lambda: any((info := where(n)).model_version == 1 and info.offset > offset
                           for n, offset in under_way.items()), 10, "a v1 sequence to go on after v2 arrived")
    load.join(120)
    assert not load.is_alive(), "the load did not finish"
    report = reports[0]
    assert time.monotonic() - arrived > 2.5, "too little of the load ran after v2 arrived: no v2 sequence is sure"

    verify = report["verify"]
    assert report["exit_code"] == EXIT_OK, (verify["mismatches"], verify["version_changes"], report["broken_streams"])
    assert verify["passed"] and not verify["version_changes"] and not verify["mismatches"]
    assert not report["broken_streams"] and not report["errors"] and report["migrations"] == 0
    # Chunks were answered by both versions, every one checked against the Keras model of the one that answered.
    counts = report["model_versions"]
    assert set(counts) == {"1", "2"} and counts["1"] > 0 and counts["2"] > 0, counts
    assert sum(counts.values()) == report["totals"]["chunks"]
    assert verify["rows_compared"] == report["totals"]["timesteps"]
    assert verify["versions"]["1"]["sequences"] >= config.streams and verify["versions"]["2"]["sequences"] >= 1
    assert sum(entry["timesteps"] for entry in verify["versions"].values()) == report["totals"]["timesteps"]
