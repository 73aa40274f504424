"""--workers N: server processes sharing one port, sharing state only through Redis."""

from __future__ import annotations

import json
import os
import uuid

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import stream_pb2_grpc
from tests.client import outputs, predict
from tests.models import TOLERANCE, keras_whole_sequence
from tests.support import DEFAULT_MODEL, wait_until


@pytest.mark.timeout(180)
def test_two_workers_share_the_port_and_every_stream(start_server) -> None:
    server = start_server("--workers", "2")
    wait_until(lambda: server.log().count('"msg": "serving"') == 2, 90, "both workers serving")
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert sorted(e["worker"] for e in entries if e["msg"] == "serving") == ["0/2", "1/2"]
    (pids,) = [e["pids"] for e in entries if e["msg"] == "started workers"]
    rng = np.random.default_rng(1)
    streams = {f"w-{uuid.uuid4().hex[:6]}-{n}": rng.normal(size=(30, 1)).astype(np.float32) for n in range(6)}
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    # A new connection for every chunk: the kernel spreads connections over the workers.
    for start in range(0, 30, 10):
        for stream, x in streams.items():
            with grpc.insecure_channel(server.address) as channel:
                stub = stream_pb2_grpc.StreamInferenceStub(channel)
                got[stream].append(outputs(predict(stub, stream, x[start : start + 10], start_offset=start)))
    for stream, x in streams.items():
        assert np.max(np.abs(np.concatenate(got[stream]) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    assert server.stop() == 0
    for pid in pids:  # SIGTERM to the supervisor stopped every worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
